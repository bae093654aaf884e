"""The Set-Encoder in the training loop and the wrappers' scripts, with tiny random models on CPU: stage 1 (8
passages + 1 duplicate, InfoNCE + duplicate BCE) learns and logs both parts, stage 2 finds it and keeps the
duplicate head frozen, resume is exact, infer.py scores each list as the model does, the novelty variant uses
NA-RankNet, and α-nDCG is reported when asked."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupt_and_resume, na_rank_net, write_tiny_collection
from crossrank.evaluation import compare
from crossrank import config
from crossrank.inference import pipeline as experiment
from crossrank.config import ROOT, load_run_config
from crossrank.training.data import load_training_data
from crossrank.models.encoding import PairTokenizer, encode_lists, load_set_tokenizer
from crossrank.errors import CrossrankError
from crossrank.training.losses import rank_net
from crossrank.training.examples import load_split
from crossrank.models.set_encoder import SetEncoder
from crossrank.training.parts import batch_loss
from crossrank.models.loading import load_model
from crossrank.training.loop import initial_weights, train


def config_of(model: Path, data: Path, out: Path, objective: str = "CL", *overrides: str):
    """-c set-encoder -m <objective>: the backbone, objective and Set-Encoder stage YAMLs, as the wrapper stacks
    them, on a tiny model and collection."""
    files = [ROOT / "configs" / "backbones" / "set-encoder.yaml", ROOT / "configs" / "objectives" / f"{objective}.yaml",
             ROOT / "configs" / "set-encoder" / f"{objective}.yaml"]
    # KD: the tiny lists have 8 passages (configs/set-encoder/KD.yaml keeps lightning-ir's 100 as the minimum)
    depth = ["data.depth=14"] if objective == "CL" else ["data.depth=8", "data.num_negatives=7", "data.min_candidates=8"]
    return load_run_config(files, [f"model.path={model}", "model.name=tiny", f"data.train={data}",
                                   f"train.models_dir={out}", "optim.lr=1e-3", "train.queries_per_batch=2",
                                   "train.accumulation=2", "train.log_every=1", *depth, *overrides])


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return {**load_file(folder / "model.safetensors"), **load_file(folder / "heads.safetensors")}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_collection(tmp_path_factory.mktemp("tiny-collection"), valid_is_train=True)


@pytest.fixture(scope="module")
def lively(tiny_bert, tmp_path_factory) -> Path:
    """A Set-Encoder folder on the tiny BERT without dropout, its Linear weights at std 0.2: at the usual 0.02
    the passages of a random tiny model barely interact, and learning takes many more steps."""
    from transformers import AutoModel

    folder = tmp_path_factory.mktemp("lively")
    AutoModel.from_pretrained(tiny_bert, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0) \
        .save_pretrained(folder / "quiet")
    load_set_tokenizer(tiny_bert).save_pretrained(folder / "quiet")
    torch.manual_seed(0)
    model = SetEncoder.from_pretrained(folder / "quiet")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, 0.2)
    model.save_pretrained(folder / "se", load_set_tokenizer(folder / "quiet"))
    return folder / "se"


@pytest.fixture(scope="module")
def stage1(lively, collection, tmp_path_factory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("models")
    # crossrank's duplicate BCE (both copies positive), whose prior the test below checks; the wrapper's
    # configs/set-encoder/CL.yaml sets the reference's (tests/test_reference_options.py)
    state = train(config_of(lively, collection["CL"], out, "CL", "train.max_steps=100", "train.eval_every=50",
                            "train.duplicate_loss=crossrank"))
    return out / "tiny.CL.f1.lr0.001.s42", state


def test_stage1_learns_and_logs_the_duplicate_bce(stage1, lively):
    run, state = stage1
    train_rows = [r for r in rows(run) if "loss" in r]
    first, last = train_rows[0], train_rows[-20:]
    assert first["loss_lce"] > 1.0 and sum(r["loss_lce"] for r in last) / 20 < 0.1  # log(8) = 2.08 at chance
    for r in train_rows:  # the logged loss is InfoNCE + 1 x duplicate BCE, each part logged
        assert r["loss"] == pytest.approx(r["loss_lce"] + r["loss_duplicate_bce"], rel=1e-5)
        assert 0.3 < r["loss_duplicate_bce"] < 1.0  # 2 of 9 have a copy: the prior alone gives 0.53
    assert state.finished and state.best_metric > 0.8 and state.best_step in (50, 100)
    selected = json.loads((run / "model" / "selected.json").read_text())
    assert selected["step"] == state.best_step
    assert {"set_encoder.json", "heads.safetensors", "model.safetensors", "crossrank.yaml"} <= \
        {p.name for p in (run / "model").iterdir()}
    start, trained = weights(lively), weights(run / "model")
    assert not torch.equal(start["duplicate.weight"], trained["duplicate.weight"])  # the BCE reached the head
    assert not torch.equal(start["score.weight"], trained["score.weight"])


def test_stage1_lists_hold_eight_passages_and_one_copy_left_out_of_infonce(lively, collection):
    cfg = config_of(lively, collection["CL"], Path("unused"), "CL")
    data, _ = load_training_data(cfg)
    batch = data.batch(0, 3, PairTokenizer(load_set_tokenizer(lively), cfg.model), listwise=True)
    assert batch.inputs["input_ids"].shape[:2] == (3, 9) and batch.mask.all()
    assert batch.duplicates.sum(1).tolist() == [2.0, 2.0, 2.0]  # both copies are "has a copy in the list"
    assert batch.ranked.sum(1).tolist() == [8, 8, 8]  # InfoNCE over the 8 sampled passages
    for row in range(3):
        copies = batch.duplicates[row].nonzero().squeeze(1).tolist()
        assert torch.equal(batch.inputs["input_ids"][row, copies[0]], batch.inputs["input_ids"][row, copies[1]])
        assert batch.ranked[row, copies].tolist() == [True, False]  # the later occurrence is the copy
        assert (batch.targets[row] * batch.ranked[row] > 0).sum() == 1  # exactly one positive


def test_stage1_recipe_lists_attend_to_91_pseudo_states_like_a_top100(lively, collection):
    """configs/set-encoder/CL.yaml: 8 passages + 1 duplicate, [INT] set of model.depth = 100 whatever
    data.num_negatives: each passage attends to its 8 list mates and 91 pseudo-states, the 99 others it meets
    when re-ranking a top-100."""
    cfg = config_of(lively, collection["CL"], Path("unused"), "CL")
    assert (cfg.model.depth, cfg.model.sample_missing_docs, cfg.data.num_negatives) == (100, True, 7)
    data, _ = load_training_data(cfg)
    model, _ = load_model(str(lively), cfg.model, training=True, duplicate=cfg.data.duplicate)
    batch = data.batch(0, 2, PairTokenizer(load_set_tokenizer(lively), cfg.model), listwise=True)
    model.train()
    layout = model.layout(batch.inputs["attention_mask"], batch.inputs["mask"])
    assert layout.num_slots == 100 and layout.real_slots.sum(1).tolist() == [9, 9]  # 91 pseudo-states each
    slots = layout.additive_mask[:, 0, 0, -100:] == 0  # [N, M]: the [INT] keys each passage may attend to
    assert slots.sum(1).tolist() == [99] * 18  # 8 real others + 91 pseudo, its own slot masked
    model.eval()  # validation and inference: deterministic, the list's own passages only
    assert model.layout(batch.inputs["attention_mask"], batch.inputs["mask"]).num_slots == 9


def test_positive_from_the_qrels_when_the_first_stage_missed_it():
    """data.add_missing_relevant (the reference's add_docs_not_in_ranking): the judged-relevant passage that the
    run does not hold becomes the positive instead of the query being dropped."""
    import random as rnd

    from crossrank.config import DataConfig
    from crossrank.training.data import TrainingData
    from crossrank.training.examples import TrainingQuery

    query = TrainingQuery("q1", ["a", "b", "c"], [3.0, 2.0, 1.0], {"z": 1, "b": 0})
    texts = {d: d for d in "abcz"}
    data = DataConfig(num_negatives=2, depth=3)
    with pytest.raises(CrossrankError, match="none of the 1 queries has a usable example"):
        TrainingData([query], {"q1": "q"}, texts, data, 42)
    stream = TrainingData([query], {"q1": "q"}, texts, DataConfig(num_negatives=2, depth=3, add_missing_relevant=True), 42)
    example = stream.example(0)
    assert example.docnos[0] == "z" and sorted(example.docnos[1:]) in (["a", "b"], ["a", "c"], ["b", "c"])
    assert example.targets[0] == 1.0 and example.targets[1:] == [0.0, 0.0]


def test_stage2_starts_from_stage1_and_freezes_the_duplicate_head(stage1, lively, collection, tmp_path):
    run, _ = stage1
    out = run.parent
    kd = config_of(lively, collection["KD"], out, "KD", "train.stage=2", "train.max_steps=2")
    assert kd.model.gradient_checkpointing and kd.data.depth == 8 and kd.train.loss == "rank_net"
    assert initial_weights(kd) == str(run / "model")
    train(kd)
    from crossrank.training.naming import checkpoint_hash

    stage2 = out / f"tiny.CL-KD.f2.from-{checkpoint_hash(run / 'model')}.lr0.001.s42"
    before, after = weights(run / "model"), weights(stage2 / "checkpoint")
    assert torch.equal(before["duplicate.weight"], after["duplicate.weight"])
    assert not torch.equal(before["score.weight"], after["score.weight"])
    assert all("loss_duplicate_bce" not in r for r in rows(stage2))
    model, _ = load_model(str(run / "model"), kd.model, training=True, duplicate=kd.data.duplicate)
    assert not any(p.requires_grad for p in model.duplicate.parameters())


def test_resume_after_sigterm_gives_identical_weights(tiny_bert, collection, tmp_path):
    """Dropout on (the tiny BERT's default), so the RNG states must be restored too."""
    steps = ["train.max_steps=10", "train.eval_every=4", "train.save_every=100"]
    straight = train(config_of(tiny_bert, collection["CL"], tmp_path / "a", "CL", *steps))
    cfg = config_of(tiny_bert, collection["CL"], tmp_path / "b", "CL", *steps)
    metrics = tmp_path / "b" / "tiny.CL.f1.lr0.001.s42" / "metrics.jsonl"

    interrupted, resumed = interrupt_and_resume(train, cfg, metrics, step=5)
    assert not interrupted.finished and 5 <= interrupted.step < 10
    assert resumed.finished and resumed.step == 10
    a, b = (tmp_path / x / "tiny.CL.f1.lr0.001.s42" for x in "ab")
    for name in ("checkpoint", "model"):
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert (resumed.best_step, resumed.best_metric) == (straight.best_step, straight.best_metric)


def _one_and_two_processes(objective: str, data: Path, model: Path, tmp_path: Path, *overrides: str):
    """The same run under torchrun (2 gloo processes x 1 query per micro-step) and in 1 process (2 micro-steps):
    the weights of both checkpoints and the start."""
    files = ["configs/backbones/set-encoder.yaml", f"configs/objectives/{objective}.yaml",
             f"configs/set-encoder/{objective}.yaml"]
    args = [a for f in files for a in ("--config", str(ROOT / f))] + [
        f"model.path={model}", "model.name=tiny", f"data.train={data}", "optim.lr=1e-3",
        "train.queries_per_batch=1", "train.accumulation=2", "train.max_steps=2", "train.eval_every=2",
        "model.sample_missing_docs=false", *overrides]  # pseudo-states are random, drawn per process like dropout
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "train.py"), *args, f"train.output_dir={tmp_path / 'ddp'}"],
                   check=True, env=env, capture_output=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args, f"train.output_dir={tmp_path / 'one'}"],
                   check=True, env=env, capture_output=True)
    return tuple(weights(folder) for folder in (tmp_path / "one" / "checkpoint", tmp_path / "ddp" / "checkpoint",
                                                model))


def test_two_process_ddp_with_the_frozen_duplicate_head_matches_one_process(lively, collection, tmp_path):
    """Stage 2 under torchrun (2 gloo processes x 1 query) == 1 process x 2 micro-steps: the frozen duplicate
    head must not make DDP wait for gradients that never come (no find_unused_parameters)."""
    one, two, start = _one_and_two_processes("KD", collection["KD"], lively, tmp_path, "data.depth=8",
                                             "data.num_negatives=7", "data.min_candidates=8")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    assert torch.equal(one["duplicate.weight"], start["duplicate.weight"])


def test_two_process_ddp_all_reduces_the_duplicate_head_like_one_process(lively, collection, tmp_path):
    """Stage 1 (InfoNCE + duplicate BCE) under torchrun == 1 process: the duplicate head's logits come from the
    forward DDP wraps (`WithDuplicates`), so its gradient is all-reduced with the rest."""
    one, two, start = _one_and_two_processes("CL", collection["CL"], lively, tmp_path, "data.depth=14")
    assert (one["duplicate.weight"] - start["duplicate.weight"]).abs().max().item() > 1e-4
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5


def _write_dataset(collection: dict[str, Path], tmp_path: Path) -> Path:
    """A dataset YAML over the tiny collection: the CL candidate lists as the bm25 run, grades 2/1 as qrels."""
    root = collection["CL"].parent
    queries = load_split(collection["CL"], "train")  # q0..q9
    lines = [f"{q.qid} Q0 {d} {r + 1} {s} bm25\n" for q in queries for r, (d, s) in enumerate(zip(q.docnos, q.scores))]
    (tmp_path / "run.txt").write_text("".join(lines))
    (tmp_path / "qrels.txt").write_text("".join(f"q{i} 0 d{i}_{j} {2 - j}\n" for i in range(10) for j in range(2)))
    dataset = tmp_path / "tiny.yaml"
    dataset.write_text(f"name: tiny\ncorpus: {root / 'corpus.tsv'}\ntopics: {root / 'topics.tsv'}\n"
                       f"qrels: {tmp_path / 'qrels.txt'}\nruns: {{bm25: {tmp_path / 'run.txt'}}}\nrel_level: 1\n")
    return dataset


def test_infer_scores_each_list_as_the_model_does_and_reports_alpha_ndcg(stage1, collection, tmp_path,
                                                                        monkeypatch, capsys):
    run, _ = stage1
    dataset = _write_dataset(collection, tmp_path)
    monkeypatch.setattr(config, "ROOT", tmp_path)
    cfg = load_run_config([ROOT / "configs" / "backbones" / "set-encoder.yaml"],
                          [f"eval.dataset={dataset}", "eval.block_queries=3", "eval.novelty=true"])
    experiment.run_inference(cfg, str(run / "model"))
    out = capsys.readouterr().out
    assert "alpha-nDCG@10" in out and "10 queries with a relevant passage" in out
    written: dict[str, dict[str, float]] = {}
    for line in (tmp_path / "runs" / f"tiny.bm25.{run.name}.run").read_text().splitlines():
        qid, _, docno, _, score, _ = line.split()
        written.setdefault(qid, {})[docno] = float(score)

    model = SetEncoder.from_pretrained(run / "model").eval()
    pairs = PairTokenizer(load_set_tokenizer(run / "model"), cfg.model)
    topics = dict(line.split("\t") for line in (collection["CL"].parent / "topics.tsv").read_text().splitlines())
    corpus = dict(line.split("\t") for line in (collection["CL"].parent / "corpus.tsv").read_text().splitlines())
    for q in load_split(collection["CL"], "train"):
        with torch.no_grad():
            direct = model(**encode_lists(pairs, model.config.interaction_token_id, [topics[q.qid]],
                                          [[corpus[d] for d in q.docnos]]))[0]  # [D]
        assert written[q.qid] == pytest.approx(dict(zip(q.docnos, direct.tolist())), abs=2e-6)

    # the checkpoint says what it is: without -c set-encoder it re-ranks the same; it is never read as mono
    plain = load_run_config([], [f"eval.dataset={dataset}", "eval.block_queries=3"])
    (tmp_path / "runs" / f"tiny.bm25.{run.name}.run").rename(tmp_path / "with-c.run")
    experiment.run_inference(plain, str(run / "model"))
    assert (tmp_path / "runs" / f"tiny.bm25.{run.name}.run").read_text() == (tmp_path / "with-c.run").read_text()
    mono = load_run_config([], [f"eval.dataset={dataset}", "model.kind=mono"])
    with pytest.raises(CrossrankError, match=r"is a set-encoder checkpoint, loaded as model.kind=mono"):
        experiment.run_inference(mono, str(run / "model"))


def test_novelty_variant_uses_na_rank_net_on_jaccard_clusters(lively, collection, tmp_path):
    cfg = config_of(lively, collection["KD"], tmp_path, "KD", "data.novelty=true", "train.max_steps=2")
    data, _ = load_training_data(cfg)
    model, tokenizer = load_model(str(lively), cfg.model, training=True, duplicate=cfg.data.duplicate)
    batch = data.batch(0, 2, tokenizer, listwise=True)
    assert batch.clusters is not None and batch.clusters.shape == (2, 8)
    # the teacher's top-2 are the query's two relevant passages, which share most words: one cluster
    assert batch.clusters[:, 0].tolist() == batch.clusters[:, 1].tolist() and batch.clusters.max() >= 5
    model.eval()
    with torch.no_grad():
        loss, parts = batch_loss(model, batch, rank_net, cfg, torch.device("cpu"))
        scores = model(**batch.inputs)
    assert parts == {}
    assert loss.item() == pytest.approx(na_rank_net(scores, batch.targets, batch.mask, batch.clusters).item(),
                                        rel=1e-6)
    assert loss.item() != pytest.approx(rank_net(scores, batch.targets, batch.mask).item(), rel=1e-3)
    state = train(cfg)
    assert state.finished and (tmp_path / "tiny-novelty.KD.f1.lr0.001.s42" / "model").is_dir()
    assert all(math.isfinite(r["loss"]) for r in rows(tmp_path / "tiny-novelty.KD.f1.lr0.001.s42") if "loss" in r)


def test_alpha_ndcg_in_compare_output_by_hand(tmp_path, capsys):
    (tmp_path / "corpus.tsv").write_text("a\tthe cat sat on the mat\nb\tthe cat sat on a mat\n"
                                         "c\triver fish boat\nx\tdog bark\n")
    (tmp_path / "qrels.txt").write_text("1 0 a 2\n1 0 b 2\n1 0 c 2\n1 0 x 0\n")
    (tmp_path / "one.run").write_text("1 Q0 a 1 4 t\n1 Q0 b 2 3 t\n1 Q0 c 3 2 t\n1 Q0 x 4 1 t\n")
    (tmp_path / "two.run").write_text("1 Q0 a 1 4 t\n1 Q0 c 2 3 t\n1 Q0 b 3 2 t\n1 Q0 x 4 1 t\n")
    runs = [str(tmp_path / "one.run"), str(tmp_path / "two.run")]
    assert compare.main(["--qrels", str(tmp_path / "qrels.txt"), *runs]) == 0
    assert "alpha-nDCG" not in capsys.readouterr().out
    assert compare.main(["--qrels", str(tmp_path / "qrels.txt"), "--novelty", *runs]) == 2
    assert "--novelty needs passage texts" in capsys.readouterr().err
    assert compare.main(["--qrels", str(tmp_path / "qrels.txt"), "--corpus", str(tmp_path / "corpus.tsv"),
                         "--novelty", *runs]) == 0
    out = capsys.readouterr().out
    # a, b: one subtopic (Jaccard 1 - 5/6); c another. one: gains 1, 0.01, 1; two (= the ideal): 1, 1, 0.01
    ideal = 1 + 1 / math.log2(3) + 0.01 / 2
    values = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()
              if line.split() and line.split()[0] in ("one", "two") and len(line.split()) == 2}
    assert values == {"one": round((1 + 0.01 / math.log2(3) + 1 / 2) / ideal, 4), "two": 1.0}


def test_config_refuses_set_encoder_parts_on_the_wrong_model():
    with pytest.raises(CrossrankError, match=r"model.truncation is invalid \(expected per_field with model.kind"):
        load_run_config([], ["model.kind=set-encoder"])
    with pytest.raises(CrossrankError, match=r"data.duplicate is invalid"):
        load_run_config([], ["data.duplicate=true"])
    cfg = load_run_config([ROOT / "configs" / "backbones" / "set-encoder.yaml", ROOT / "configs" / "objectives" /
                           "KD.yaml", ROOT / "configs" / "set-encoder" / "KD.yaml"])
    assert (cfg.model.kind, cfg.model.truncation, cfg.model.query_length, cfg.model.passage_length) == \
        ("set-encoder", "per_field", 32, 256)
    assert (cfg.data.depth, cfg.data.num_negatives, cfg.data.targets, cfg.model.gradient_checkpointing) == \
        (100, 99, "teacher_rank", True)
