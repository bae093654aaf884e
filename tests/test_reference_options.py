"""The reference behaviours as options (docs/reference-options.md): each test fails on the code before them."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch

from crossrank.config import ROOT, DataConfig, load_run_config
from crossrank.errors import CrossrankError


# 1. train.duplicate_loss
def test_duplicate_loss_reference_scores_only_the_originals_with_pos_weight_minus_half():
    from crossrank.novelty import duplicate_loss, duplicate_targets

    docnos = [f"d{i}" for i in range(8)] + ["d2"]  # 8 passages + a copy of the third, appended
    targets = duplicate_targets([docnos])
    mask = torch.ones(1, 9, dtype=torch.bool)
    ranked = mask.clone()
    ranked[0, 8] = False  # the copy is left out of the ranking (Batch.ranked)
    logits = torch.zeros(1, 9)
    assert duplicate_loss("reference", logits, targets, mask, ranked).item() == pytest.approx(
        (7 * math.log(2) - 0.5 * math.log(2)) / 8, abs=1e-6)  # 0.563182
    assert duplicate_loss("crossrank", logits, targets, mask, ranked).item() == pytest.approx(math.log(2), abs=1e-6)
    assert load_run_config([], ["train.duplicate_loss=reference"]).train.duplicate_loss == "reference"
    with pytest.raises(CrossrankError, match="train.duplicate_loss"):
        load_run_config([], ["train.duplicate_loss=other"])


# 2. data.keep_no_positive
def test_keep_no_positive_keeps_a_cl_query_without_a_relevant_candidate():
    from crossrank.training.data import TrainingData
    from crossrank.training.examples import TrainingQuery

    docnos = [f"p{i}" for i in range(10)]
    query = TrainingQuery("q", docnos, [float(10 - i) for i in range(10)], {})
    data = TrainingData([query], {"q": "query"}, {d: d for d in docnos},
                        DataConfig(sampling="single_relevant", num_negatives=3, depth=10, keep_no_positive=True), 42)
    assert len(data) == 1 and data.dropped == 0
    example = data.example(0)
    assert len(set(example.docnos)) == 4 and set(example.docnos) <= set(docnos) and example.targets == [0.0] * 4
    with pytest.raises(CrossrankError, match="usable example"):
        TrainingData([query], {"q": "query"}, {d: d for d in docnos},
                     DataConfig(sampling="single_relevant", num_negatives=3, depth=10), 42)


# 3. train.eval_unit
@pytest.mark.parametrize("unit, steps", [("micro_batch", [2, 4]), ("step", [4])])
def test_eval_unit_micro_batch_validates_as_lightning_counts(tiny_bert, tmp_path, unit, steps):
    from tests.conftest import write_tiny_collection
    from crossrank.training.loop import train

    folders = write_tiny_collection(tmp_path / "coll")
    cfg = load_run_config([ROOT / "configs" / "objectives" / "CL.yaml"], [
        f"model.path={tiny_bert}", "model.name=tiny", f"data.train={folders['CL']}", f"train.models_dir={tmp_path}",
        "data.num_negatives=3", "data.depth=14", "train.queries_per_batch=1", "train.accumulation=2",
        "train.max_steps=4", "train.eval_every=4", f"train.eval_unit={unit}", "train.log_every=1",
        "train.precision=fp32"])
    train(cfg)
    metrics = next(tmp_path.glob("tiny.CL.f1.*")) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if any(k.startswith("valid_") for k in r)] == steps


# 4. preprocessing.py --split sklearn
def test_split_sklearn_is_the_seeds_train_test_split(tmp_path):
    from crossrank.training import preprocessing
    from crossrank.training.examples import load_split

    run = tmp_path / "run.txt"
    run.write_text("".join(f"{q} Q0 d{q}_{r} {r + 1} {10 - r} x\n" for q in range(1000, 1250) for r in range(2)))
    preprocessing.preprocess_run(run, {}, tmp_path / "s", 1, 42, progress=False, split="sklearn")
    assert {q.qid for q in load_split(tmp_path / "s", "valid")} == {"1006", "1097", "1142"}
    preprocessing.preprocess_run(run, {}, tmp_path / "h", 1, 42, progress=False)
    assert {q.qid for q in load_split(tmp_path / "h", "valid")} == {"1006", "1053", "1214"}
    try:
        from sklearn.model_selection import train_test_split
    except ImportError:
        return
    qids = [str(q) for q in random.Random(0).sample(range(10**7), 10_000)]
    assert preprocessing.sklearn_validation(qids, 1, 42) == set(train_test_split(qids, test_size=0.01,
                                                                                 random_state=42)[1])


def test_split_is_recorded_in_meta(tmp_path, monkeypatch):
    from crossrank.training import preprocessing
    from crossrank.training.examples import load_meta

    run = tmp_path / "run.txt"
    run.write_text("".join(f"{q} Q0 d{r} {r + 1} {10 - r} x\n" for q in range(1, 30) for r in range(2)))
    (tmp_path / "topics.tsv").write_text("".join(f"{q}\tq{q}\n" for q in range(1, 30)))
    (tmp_path / "ds.yaml").write_text(f"name: ds\ncorpus: {tmp_path}/c.tsv\ntopics: {tmp_path}/topics.tsv\n"
                                      f"runs:\n  bm25: {run}\n")
    folder = preprocessing.prepare(str(tmp_path / "ds.yaml"), "CL", evalperc=10, out=str(tmp_path / "o"),
                                   split="sklearn")
    assert load_meta(folder)["split"] == "sklearn"


# 5. data.min_candidates
def test_min_candidates_drops_short_teacher_lists():
    from crossrank.training.data import TrainingData
    from crossrank.training.examples import TrainingQuery

    queries = [TrainingQuery(q, [f"{q}{i}" for i in range(n)], [float(n - i) for i in range(n)], {})
               for q, n in (("a", 100), ("b", 60))]
    passages = {d: d for q in queries for d in q.docnos}
    config = dict(sampling="top", num_negatives=99, depth=100, targets="teacher_rank")
    data = TrainingData(queries, {"a": "a", "b": "b"}, passages, DataConfig(**config, min_candidates=100), 1)
    assert len(data) == 1 and data.dropped == 1
    assert len(TrainingData(queries, {"a": "a", "b": "b"}, passages, DataConfig(**config), 1)) == 2
    with pytest.raises(CrossrankError, match="data.min_candidates"):
        load_run_config([], ["data.min_candidates=-1"])


# 6. train.novelty_ties
def test_novelty_ties_all_gives_every_tied_top_member_the_target():
    from conftest import na_rank_net
    from crossrank.novelty import novelty_targets

    scores, targets = torch.tensor([[1.0, 1.0, 0.5]]), torch.tensor([[3.0, 2.0, 1.0]])
    clusters, mask = torch.tensor([[0, 0, 1]]), torch.ones(1, 3, dtype=torch.bool)
    assert novelty_targets(scores, targets, clusters, mask, ties="all").tolist() == [[3.0, 3.0, 1.0]]
    assert novelty_targets(scores, targets, clusters, mask).tolist() == [[3.0, 0.0, 1.0]]
    assert na_rank_net(scores, targets, mask, clusters, ties="all").item() == pytest.approx(0.474077, abs=1e-5)
    assert na_rank_net(scores, targets, mask, clusters).item() == pytest.approx(0.713767, abs=1e-5)


# 7. preprocessing.py --texts dataset
def test_texts_dataset_trains_on_the_datasets_text(tmp_path):
    from crossrank.training import preprocessing
    from crossrank.training.data import load_training_data

    item = {"query_id": "5", "query": "rankgpt query", "positive_passages": [],
            "retrieved_passages": [{"docid": "7", "rank": 1, "text": "x"}, {"docid": "8", "rank": 2, "text": "z"}]}
    (tmp_path / "train.jsonl").write_text(json.dumps(item) + "\n")
    (tmp_path / "answers.json").write_text(json.dumps(["[1] > [2]"]))
    (tmp_path / "corpus.tsv").write_text("7\ty\n8\tw\n")
    (tmp_path / "topics.tsv").write_text("5\tdataset query\n")
    (tmp_path / "ds.yaml").write_text(
        f"name: ds\ncorpus: {tmp_path}/corpus.tsv\ntopics: {tmp_path}/topics.tsv\n"
        f"teacher: {tmp_path}/train.jsonl\nteacher_answers: {tmp_path}/answers.json\n")
    texts = {}
    for mode in ("dataset", "teacher"):
        folder = preprocessing.prepare(str(tmp_path / "ds.yaml"), "KD", evalperc=0, out=str(tmp_path / mode),
                                       texts=mode)
        cfg = load_run_config([], [f"data.train={folder}", "data.sampling=top", "data.num_negatives=1",
                                   "data.depth=2", "data.targets=teacher_rank"])
        texts[mode] = load_training_data(cfg)[0].passages["7"]
    assert texts == {"dataset": "y", "teacher": "x"}
    (tmp_path / "train.jsonl").write_text(json.dumps({k: v for k, v in item.items() if k != "query_id"}) + "\n")
    with pytest.raises(CrossrankError, match="train.jsonl:1: no query_id"):
        preprocessing.prepare(str(tmp_path / "ds.yaml"), "KD", evalperc=0, out=str(tmp_path / "no-qid"))
