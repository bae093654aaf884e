"""The demo collection is deterministic and has learnable signal a lexical ranker cannot fully use."""
from __future__ import annotations

from crossrank import demo
from crossrank.data.qrels import read_qrels
from crossrank.data.runs import load_run
from crossrank.data.texts import read_topics


def test_demo_is_deterministic_and_consistent(tmp_path):
    counts = demo.generate(tmp_path / "a")
    demo.generate(tmp_path / "b")
    for name in ("corpus.tsv", "topics.train.tsv", "topics.test.tsv", "qrels.train.txt", "qrels.test.txt",
                 "teacher.train.run"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    train, test = read_topics(tmp_path / "a" / "topics.train.tsv"), read_topics(tmp_path / "a" / "topics.test.tsv")
    assert len(train) == counts["train_queries"] and len(test) == counts["test_queries"]
    assert not set(train) & set(test) and not set(train.values()) & set(test.values())
    qrels = read_qrels(tmp_path / "a" / "qrels.test.txt")
    assert set(qrels) == set(test)
    # every test query has highly relevant documents, and graded judgements 0..3 all occur
    assert all(any(rel == 3 for rel in judged.values()) for judged in qrels.values())
    assert {rel for judged in qrels.values() for rel in judged.values()} == {0, 1, 2, 3}
    teacher = load_run(tmp_path / "a" / "teacher.train.run")
    assert set(teacher) == set(train) and all(len(r) == 20 for r in teacher.values())


def test_teacher_is_good_but_not_perfect(tmp_path):
    import ir_measures
    from ir_measures import nDCG

    demo.generate(tmp_path)
    qrels = list(ir_measures.read_trec_qrels(str(tmp_path / "qrels.train.txt")))
    teacher = list(ir_measures.read_trec_run(str(tmp_path / "teacher.train.run")))
    value = ir_measures.calc_aggregate([nDCG @ 10], qrels, teacher)[nDCG @ 10]
    assert 0.6 < value < 0.98
