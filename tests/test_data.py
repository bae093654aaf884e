"""Training examples: sampling strategies, targets, the deterministic stream, collate, loading a folder."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from conftest import write_tiny_collection
from crossrank.config import DataConfig, ModelConfig, load_run_config
from crossrank.training.data import TrainingData, collate, load_training_data, sample_candidates, targets_of
from crossrank.models.encoding import PairTokenizer
from crossrank.errors import CrossrankError
from crossrank.models.mono import load_tokenizer
from crossrank.training.examples import TrainingQuery, write_meta, write_split

# 12 candidates; within the top 8, d3 (grade 2) and d7 (grade 1) are relevant, d5 is judged non-relevant;
# d10 is relevant but below the top 8
QUERY = TrainingQuery("q1", [f"d{i}" for i in range(12)], [float(100 - i) for i in range(12)],
                        {"d3": 2, "d7": 1, "d5": 0, "d10": 1})


def test_single_relevant_draws_one_relevant_from_the_top_depth_then_non_relevant():
    data = DataConfig(sampling="single_relevant", num_negatives=3, depth=8)
    firsts = Counter()
    for seed in range(200):
        positions = sample_candidates(QUERY, data, random.Random(seed))
        docnos = [QUERY.docnos[i] for i in positions]
        assert len(docnos) == 4 and len(set(docnos)) == 4
        assert docnos[0] in ("d3", "d7")
        assert all(d not in ("d3", "d7", "d10") and int(d[1:]) < 8 for d in docnos[1:])
        firsts[docnos[0]] += 1
        assert targets_of(QUERY, positions, data)[1:] == [0.0, 0.0, 0.0]
    assert firsts["d3"] > 50 and firsts["d7"] > 50  # both relevant passages are drawn
    # fewer non-relevant candidates than asked: all of them, no error
    assert len(sample_candidates(QUERY, DataConfig(num_negatives=99, depth=8), random.Random(0))) == 1 + 6
    # no relevant passage in the top depth: no example
    assert sample_candidates(QUERY, DataConfig(num_negatives=3, depth=3), random.Random(0)) is None


def test_relevant_level_makes_grade_1_a_negative():
    data = DataConfig(sampling="single_relevant", num_negatives=7, depth=8, relevant_level=2)
    for seed in range(50):
        docnos = [QUERY.docnos[i] for i in sample_candidates(QUERY, data, random.Random(seed))]
        assert docnos[0] == "d3" and "d7" in docnos[1:]  # grade 1 is only "related" at level 2


def test_relevant_targets_follow_relevant_level_like_sampling():
    """BCE's 0/1 labels: at level 2 the grade-1 d7 is a negative, as it is for single_relevant sampling."""
    assert targets_of(QUERY, [3, 7, 5, 0], DataConfig(targets="relevant", relevant_level=2)) == [1.0, 0.0, 0.0, 0.0]
    assert targets_of(QUERY, [3, 7, 5, 0], DataConfig(targets="relevant", relevant_level=1)) == [1.0, 1.0, 0.0, 0.0]


def test_top_with_teacher_rank_and_teacher_score_targets():
    data = DataConfig(sampling="top", num_negatives=3, depth=20, targets="teacher_rank")
    positions = sample_candidates(QUERY, data, random.Random(0))
    assert positions == [0, 1, 2, 3]
    assert targets_of(QUERY, positions, data) == [20.0, 19.0, 18.0, 17.0]  # depth + 1 - rank
    score_data = DataConfig(sampling="top", num_negatives=3, depth=20, targets="teacher_score")
    assert targets_of(QUERY, positions, score_data) == [100.0, 99.0, 98.0, 97.0]
    assert targets_of(QUERY, [3, 7, 5], DataConfig(targets="relevance")) == [2.0, 1.0, 0.0]


def test_random_and_log_random_stay_in_the_top_depth_and_log_random_favours_the_top():
    mean_rank = {}
    for sampling in ("random", "log_random"):
        data = DataConfig(sampling=sampling, num_negatives=2, depth=10)
        ranks = []
        for seed in range(2000):
            positions = sample_candidates(QUERY, data, random.Random(seed))
            assert len(positions) == 3 and positions == sorted(set(positions)) and positions[-1] < 10
            ranks += positions
        mean_rank[sampling] = sum(ranks) / len(ranks)
    assert mean_rank["random"] == pytest.approx(4.5, abs=0.15)  # uniform over 0..9
    assert mean_rank["log_random"] < mean_rank["random"] - 0.3


def stream(seed: int = 42) -> TrainingData:
    queries = [TrainingQuery(f"q{i}", [f"d{i}_{j}" for j in range(6)], [1.0] * 6, {f"d{i}_{i % 6}": 1})
               for i in range(5)]
    queries.append(TrainingQuery("none", ["x", "y"], [1.0, 0.5], {}))  # no relevant: dropped
    return TrainingData(queries, {}, {}, DataConfig(num_negatives=2, depth=6), seed)


def test_stream_is_a_function_of_seed_and_position():
    a, b, other = stream(), stream(), stream(seed=7)
    assert len(a) == 5 and a.dropped == 1
    assert [a.example(p) for p in range(12)] == [b.example(p) for p in reversed(range(12))][::-1]
    assert [a.example(p) for p in range(12)] != [other.example(p) for p in range(12)]
    for epoch in range(3):  # every epoch visits each query once, in its own order, with fresh negatives
        assert sorted(a.example(epoch * 5 + i).qid for i in range(5)) == [f"q{i}" for i in range(5)]
    assert [a.example(i).qid for i in range(5)] != [a.example(5 + i).qid for i in range(5)]
    with pytest.raises(CrossrankError, match="none of the 1 queries has a usable example"):
        TrainingData([TrainingQuery("none", ["x"], [1.0], {})], {}, {}, DataConfig(), 42)


def test_collate_pads_queries_and_encodes_only_real_pairs(tiny_bert):
    from crossrank.training.data import Example

    pairs = PairTokenizer(load_tokenizer(tiny_bert), ModelConfig())
    examples = [Example("q1", ["d1", "d2", "d3"], [1.0, 0.0, 0.0]), Example("q2", ["d2", "d1"], [0.0, 2.0])]
    batch = collate(examples, {"q1": "cat", "q2": "dog"}, {"d1": "cat mat", "d2": "dog bark", "d3": "fish"}, pairs)
    assert batch.mask.tolist() == [[True, True, True], [True, True, False]]
    assert batch.targets.tolist() == [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]
    assert len(batch.pairs) == batch.num_pairs == 5 and batch.inputs == {}
    tokenizer = load_tokenizer(tiny_bert)
    assert tokenizer.decode(batch.pairs[3][0], skip_special_tokens=True) == "dog dog bark"
    assert [len(ids) for ids, _ in batch.pairs] == [6, 6, 5, 6, 6]  # unpadded: the loop pads per chunk


def test_load_training_data_reads_texts_from_meta_sources(tmp_path):
    folders = write_tiny_collection(tmp_path)
    cfg = load_run_config([], [f"data.train={folders['CL']}", "data.depth=14", "data.num_negatives=7", "eval.depth=5"])
    data, valid = load_training_data(cfg)
    assert len(data) == 10 and [q.qid for q in valid] == ["q10", "q11"]
    assert data.data.relevant_level == 1  # meta.yaml without rel_level: the seed's rel > 0
    assert all(len(q.docnos) == 5 for q in valid)  # cut to eval.depth
    example = data.example(0)
    assert data.topics[example.qid] in ("cat mat dog bark river fish bank money paris france london england "
                                        "computer program python code neural network search engine")
    assert all(d in data.passages for d in example.docnos)

    (tmp_path / "topics.tsv").write_text("q0\tcat mat\n")  # the other qids lose their text
    with pytest.raises(CrossrankError, match=r"topics.tsv: 11 training/validation qids have no text \(e.g. q1, "):
        load_training_data(cfg)
    write_meta(folders["CL"], {"dataset": "tiny", "corpus": str(tmp_path / "corpus.tsv")})
    with pytest.raises(CrossrankError, match=r"meta.yaml: no topics source"):
        load_training_data(cfg)


def test_missing_folder_names_the_fix(tmp_path):
    cfg = load_run_config([], [f"data.train={tmp_path / 'nowhere'}"])
    with pytest.raises(CrossrankError, match="run preprocessing.py"):
        load_training_data(cfg)
    write_split(tmp_path, "train", [])  # a folder without meta.yaml
    with pytest.raises(CrossrankError, match="meta.yaml: no such file"):
        load_training_data(load_run_config([], [f"data.train={tmp_path}"]))
