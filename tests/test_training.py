"""The training loop on CPU with tiny random models: it learns, it resumes exactly, DDP matches one process,
stage 2 finds its stage-1 model, and divergence or collapse stops the run with a clear message."""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import interrupt_and_resume, write_tiny_collection
from crossrank.config import ROOT, load_run_config
from crossrank.errors import CrossrankError
from crossrank.training.examples import TrainingQuery, write_meta, write_split
from crossrank.training.loop import initial_weights, train


def config(model: Path, data: Path, out: Path, objective: str = "CL", *overrides: str):
    return load_run_config([ROOT / "configs" / "objectives" / f"{objective}.yaml"], [
        f"model.path={model}", "model.name=tiny", f"data.train={data}", f"train.models_dir={out}",
        "data.num_negatives=7", "data.depth=14", "optim.lr=3e-3", "train.queries_per_batch=2",
        "train.accumulation=2", "train.log_every=1", *overrides])


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def copy_model(source: Path, target: Path, **config_changes) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(source, **config_changes)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def quiet_bert(tiny_bert, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: it learns the tiny set reliably, and DDP can match one process."""
    return copy_model(tiny_bert, tmp_path_factory.mktemp("quiet") / "bert", hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, Path]:
    return write_tiny_collection(tmp_path_factory.mktemp("tiny-collection"), valid_is_train=True)


def test_overfits_tiny_set_and_saves_loadable_models(quiet_bert, collection, tmp_path):
    # the untrained model (same seeded head, one step at a negligible lr) is the reference: what the random
    # initialisation of a given transformers release scores is not what this test is about
    untrained = train(config(quiet_bert, collection["CL"], tmp_path / "untrained", "CL", "optim.lr=1e-12",
                             "train.max_steps=1", "model.freeze_position_embeddings=false")).best_metric
    # the tiny model's position embeddings are random, not pretrained: let them learn here
    state = train(config(quiet_bert, collection["CL"], tmp_path, "CL", "optim.lr=4e-3", "train.max_steps=240",
                         "train.eval_every=120", "model.freeze_position_embeddings=false"))
    run = tmp_path / "tiny.CL.f1.lr0.004.s42"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert sum(losses[-20:]) / 20 < 0.2 * losses[0]  # the training loss falls to a fifth of where it started
    # validation = the training queries here: at least half of the way from the untrained model to perfect
    assert state.finished and untrained < 0.9 and state.best_metric >= untrained + 0.5 * (1 - untrained)
    assert (run / "curve.png").is_file()
    assert json.loads((run / "model" / "selected.json").read_text())["step"] == state.best_step in (120, 240)

    # the selected model loads unchanged in transformers and in sentence-transformers, with the same scores
    from sentence_transformers import CrossEncoder
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    pairs = [("cat mat", "cat mat the of cat mat"), ("cat mat", "river fish and is river fish")]
    hf = AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    with torch.no_grad():
        hf_scores = hf(**tokenizer([q for q, _ in pairs], [p for _, p in pairs], padding=True,
                                   return_tensors="pt")).logits.squeeze(-1)
    st_scores = CrossEncoder(str(run / "model"), activation_fn=torch.nn.Identity()).predict(pairs)
    assert torch.allclose(hf_scores, torch.tensor(st_scores), atol=1e-5)
    assert hf_scores[0] > hf_scores[1]

    # stage 2 (KD) starts from that model, found by the naming convention, with a fresh optimiser
    kd = config(quiet_bert, collection["KD"], tmp_path, "KD", "train.stage=2", "train.max_steps=2",
                "data.num_negatives=7", "data.depth=8", "train.queries_per_batch=2", "train.accumulation=1")
    assert initial_weights(kd) == str(run / "model")
    train(kd)
    from crossrank.training.naming import checkpoint_hash

    # stage 2 has its own lr (here the default of config()) and names the weights it started from
    stage2 = tmp_path / f"tiny.CL-KD.f2.from-{checkpoint_hash(run / 'model')}.lr0.003.s42"
    assert str(run / "model") in (stage2 / "crossrank.yaml").read_text()
    assert not (stage2 / "checkpoint" / "state.pt").stat().st_size == 0


def test_resume_after_sigterm_gives_identical_weights(tiny_bert, collection, tmp_path):
    """2N steps straight == N steps, SIGTERM, rerun: the same weights bit for bit (dropout is on, so the RNG
    states must be restored too; validation and best-model selection cross the interruption). Chunks of <= 48
    tokens: cached score gradients, several backwards per micro-batch."""
    steps = ["train.max_steps=12", "train.eval_every=4", "train.save_every=100", "train.batch_tokens=48"]
    straight = train(config(tiny_bert, collection["CL"], tmp_path / "a", "CL", *steps))
    cfg = config(tiny_bert, collection["CL"], tmp_path / "b", "CL", *steps)
    metrics = tmp_path / "b" / "tiny.CL.f1.lr0.003.s42" / "metrics.jsonl"

    interrupted, resumed = interrupt_and_resume(train, cfg, metrics, step=5)
    assert not interrupted.finished and 5 <= interrupted.step < 12
    assert resumed.finished and resumed.step == 12
    a, b = (tmp_path / x / "tiny.CL.f1.lr0.003.s42" for x in "ab")
    for name in ("checkpoint", "model"):
        wa, wb = weights(a / name), weights(b / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    assert (resumed.best_step, resumed.best_metric) == (straight.best_step, straight.best_metric)
    rows = [json.loads(line)["step"] for line in (b / "metrics.jsonl").read_text().splitlines() if "loss" in line]
    assert rows == list(range(1, 13))  # rows logged after the checkpoint were dropped, then logged again
    changed = config(tiny_bert, collection["CL"], tmp_path / "b", "CL", *steps, "data.num_negatives=5")
    with pytest.raises(CrossrankError, match=r"checkpoint was trained with other settings \(data.num_negatives\)"):
        train(changed)


def test_frozen_position_embeddings_stay_unchanged_after_a_step(tiny_bert, collection, tmp_path):
    """model.freeze_position_embeddings (the multi-stage seed's recipe, on by default): one AdamW step with
    weight decay moves the word embeddings but not the position embeddings; switched off, both move."""
    before = weights(tiny_bert)
    position = next(k for k in before if k.endswith("embeddings.position_embeddings.weight"))
    word = next(k for k in before if k.endswith("embeddings.word_embeddings.weight"))
    for frozen in (True, False):
        out = tmp_path / str(frozen)
        train(config(tiny_bert, collection["CL"], out, "CL", "train.max_steps=1", f"train.output_dir={out}",
                     f"model.freeze_position_embeddings={frozen}"))
        after = weights(out / "checkpoint")
        assert torch.equal(before[position], after[position]) == frozen
        assert not torch.equal(before[word], after[word])


def test_frozen_lower_layers_stay_unchanged_and_the_upper_ones_train(tiny_bert, collection, tmp_path):
    """model.freeze_layers=1: the embeddings and layer 0 keep their pretrained weights after AdamW steps with
    weight decay; layer 1 and the head move. Freezing every layer is refused in one line."""
    before = weights(tiny_bert)
    out = tmp_path / "frozen"
    train(config(tiny_bert, collection["CL"], out, "CL", "train.max_steps=2", f"train.output_dir={out}",
                 "model.freeze_layers=1"))
    after = weights(out / "checkpoint")
    moved = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert not any(".embeddings." in k or ".layer.0." in k for k in moved)
    assert any(".layer.1." in k for k in moved)
    layers = len({k.split(".layer.")[1].split(".")[0] for k in before if ".layer." in k})
    with pytest.raises(CrossrankError, match=f"model.freeze_layers={layers}: .* has {layers} transformer layers"):
        train(config(tiny_bert, collection["CL"], tmp_path / "all", "CL", f"model.freeze_layers={layers}",
                     f"train.output_dir={tmp_path / 'all'}"))


@pytest.mark.parametrize("batch_tokens", [4096, 48])  # one chunk (straight) | several (cached, many backwards)
def test_two_process_ddp_matches_one_process(quiet_bert, collection, tmp_path, batch_tokens):
    """Same global batch (2 queries x accumulation 2): 2 gloo processes x 1 micro-step == 1 process x 2.
    Dropout off; the sums run in another order, so weights agree to 1e-4, not bit for bit: LCE is shift-invariant,
    so the head's bias gets a gradient of ~0 whose rounding noise Adam scales up to steps of up to lr (1e-3); a
    process that skipped the all-reduce would step on half the data and differ by ~lr almost everywhere."""
    model = quiet_bert
    args = [f"model.path={model}", "model.name=tiny", f"data.train={collection['CL']}", "data.num_negatives=7",
            "data.depth=14", "optim.lr=1e-3", "train.queries_per_batch=2", "train.accumulation=2",
            "train.max_steps=4", "train.eval_every=2", "train.log_every=1", f"train.batch_tokens={batch_tokens}", "model.freeze_position_embeddings=false"]
    objective = str(ROOT / "configs" / "objectives" / "CL.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(ROOT / "train.py"), "--config", objective, *args, f"train.output_dir={tmp_path / 'ddp'}"],
                   check=True, env=env, capture_output=True)
    train(load_run_config([objective], [*args, f"train.output_dir={tmp_path / 'one'}"]))
    one, two = weights(tmp_path / "one" / "checkpoint"), weights(tmp_path / "ddp" / "checkpoint")
    initial = weights(model)
    assert max((one[k] - initial[k]).abs().max().item() for k in one) > 1e-4  # training moved the weights
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-4
    saved = torch.load(tmp_path / "ddp" / "checkpoint" / "state.pt", weights_only=True)["state"]
    assert saved["cursor"] == 4 * 4 and len(saved["rng"]) == 2


def test_stage2_lookup_finds_the_right_folder_and_fails_clearly(tmp_path):
    for name in ("tiny.CL.f1.lr1e-05.s42", "tiny.KD.f1.lr1e-05.s42", "tiny.CL.f1.lr2e-05.s7",
                 "other.CL.f1.lr1e-05.s42"):
        (tmp_path / name / "model").mkdir(parents=True)

    def cfg(*overrides):
        return load_run_config([], ["model.name=tiny", f"train.models_dir={tmp_path}", "train.stage=2", *overrides])

    assert initial_weights(cfg("train.objective=CL")) == str(tmp_path / "tiny.KD.f1.lr1e-05.s42" / "model")
    # the stage-2 seed does not pick the stage-1 run: a stage 2 with seed 7 still finds the only KD one (s42)
    assert initial_weights(cfg("train.objective=CL", "train.seed=7")) == str(tmp_path / "tiny.KD.f1.lr1e-05.s42" / "model")
    two_seeds = r"2 checkpoints \(tiny\.CL\.f1\.lr1e-05\.s42, tiny\.CL\.f1\.lr2e-05\.s7\)"
    with pytest.raises(CrossrankError, match=two_seeds):
        initial_weights(cfg("train.objective=KD", "train.seed=7"))
    assert initial_weights(cfg("train.objective=KD", "train.previous_seed=7")) == \
        str(tmp_path / "tiny.CL.f1.lr2e-05.s7" / "model")
    assert initial_weights(cfg("train.objective=KD", "train.seed=7", "train.previous_seed=42")) == \
        str(tmp_path / "tiny.CL.f1.lr1e-05.s42" / "model")
    with pytest.raises(CrossrankError, match=r"no checkpoint matching tiny\.CL\.f1\.\* seed=3 .*there: other\.CL"):
        initial_weights(cfg("train.objective=KD", "train.previous_seed=3"))
    with pytest.raises(CrossrankError, match=r"no checkpoint matching tiny\.KD\.f1\."):
        initial_weights(cfg("train.objective=CL", "train.previous=KD", "train.previous_seed=7"))
    (tmp_path / "tiny.CL.f1.lr3e-05.s42" / "model").mkdir(parents=True)
    two = r"2 checkpoints \(tiny\.CL\.f1\.lr1e-05\.s42, tiny\.CL\.f1\.lr3e-05\.s42\)"
    with pytest.raises(CrossrankError, match=two):
        initial_weights(cfg("train.objective=KD", "train.previous_seed=42"))
    assert initial_weights(cfg("train.objective=KD", "train.previous_lr=3e-5")).endswith("lr3e-05.s42/model")


def test_resuming_into_a_folder_with_another_start_is_refused_before_loading(tiny_bert, collection, tmp_path):
    """train.output_dir fixes the folder, so only the recipe check can tell: the requested start is compared
    with the checkpoint's before any weights are loaded (the other start here is not even a model)."""
    out = tmp_path / "run"
    train(config(tiny_bert, collection["CL"], tmp_path, "CL", "train.max_steps=1", f"train.output_dir={out}"))
    elsewhere = tmp_path / "not-a-model"
    elsewhere.mkdir()
    with pytest.raises(CrossrankError, match=r"checkpoint was trained with other settings \(train.stage, train.init_from\)"):
        train(config(tiny_bert, collection["CL"], tmp_path, "CL", "train.max_steps=2", f"train.output_dir={out}",
                     "train.stage=2", f"train.init_from={elsewhere}"))


def test_run_folder_names_the_dataset_and_the_stage2_start(tmp_path):
    """The dataset appears unless it is the default; a stage 2 names 8 hex digits of its start's weights."""
    from crossrank.training.naming import checkpoint_hash
    from crossrank.training.loop import run_folder

    for name, content in (("a", b"weights a"), ("b", b"weights b")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(content)

    def cfg(*overrides):
        return load_run_config([], ["model.name=tiny", f"train.models_dir={tmp_path}", *overrides])

    assert run_folder(cfg()).name == "tiny.CL.f1.lr1e-05.s42"
    assert run_folder(cfg("data.dataset=msmarco-train")).name == "tiny.CL.f1.msmarco-train.lr1e-05.s42"
    a = run_folder(cfg("train.stage=2", "train.objective=KD", f"train.init_from={tmp_path / 'a'}"))
    b = run_folder(cfg("train.stage=2", "train.objective=KD", f"train.init_from={tmp_path / 'b'}"))
    assert a.name == f"tiny.CL-KD.f2.from-{checkpoint_hash(tmp_path / 'a')}.lr1e-05.s42" and a != b
    assert len(checkpoint_hash(tmp_path / "a")) == 8 and checkpoint_hash(tmp_path / "a") != checkpoint_hash(tmp_path / "b")


def test_nan_in_a_batch_stops_the_run(tiny_bert, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (tmp_path / "topics.tsv").write_text("q1\tcat mat\nq2\tdog bark\n")
    (tmp_path / "corpus.tsv").write_text("d1\tcat mat\nd2\tdog bark\nd3\triver fish\n")
    write_split(folder, "train", [TrainingQuery("q1", ["d1", "d3"], [2.0, 1.0], {}),
                                  TrainingQuery("q2", ["d2", "d3"], [float("nan"), 1.0], {})])
    write_split(folder, "valid", [])
    write_meta(folder, {"dataset": "t", "objective": "KD", "topics": str(tmp_path / "topics.tsv"),
                        "corpus": str(tmp_path / "corpus.tsv"), "qrels": "", "evalperc": 0, "seed": 42})
    cfg = config(tiny_bert, folder, tmp_path, "KD", "train.loss=margin_mse", "data.targets=teacher_score",
                 "data.depth=2", "data.num_negatives=1", "train.max_steps=4")
    with pytest.raises(CrossrankError, match=r"step 1: the loss is nan \(training diverged"):
        train(cfg)


def test_constant_validation_scores_stop_the_run(tiny_bert, collection, tmp_path):
    model = copy_model(tiny_bert, tmp_path / "flat")
    tensors = weights(model)
    tensors["classifier.weight"].zero_()  # every pair gets the bias: a collapsed model
    from safetensors.torch import save_file
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    cfg = config(model, collection["CL"], tmp_path, "CL", "optim.lr=1e-12", "train.max_steps=1")
    with pytest.raises(CrossrankError, match=r"validation: all \d+ scores are .* \(the model collapsed"):
        train(cfg)


def test_lr_schedule_warmup_then_constant_or_linear_decay():
    from crossrank.config import OptimConfig
    from crossrank.training.loop import lr_at

    constant = OptimConfig(lr=1.0, warmup_steps=4, schedule="constant")
    assert [lr_at(s, constant, 10) for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    linear = OptimConfig(lr=1.0, warmup_steps=2, schedule="linear")
    assert [lr_at(s, linear, 10) for s in (0, 1, 2, 6, 9)] == [0.5, 1.0, 1.0, 0.5, 0.125]


def test_train_py_reports_bad_input_in_one_line_and_exits_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), f"data.train={tmp_path / 'nowhere'}"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {tmp_path / 'nowhere' / 'meta.yaml'}: no such file "
                                                f"(run preprocessing.py for this dataset and objective first)"]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), "train.los=lce"], capture_output=True, text=True)
    assert done.returncode == 2 and "did you mean train.loss?" in done.stderr


@pytest.mark.parametrize("loss", ["lce", "bce", "rank_net", "list_net", "adr_mse", "margin_mse"])
def test_every_loss_trains_in_the_loop(quiet_bert, collection, tmp_path, loss):
    targets = "teacher_score" if loss == "margin_mse" else "teacher_rank"
    state = train(config(quiet_bert, collection["KD"], tmp_path, "KD", f"train.loss={loss}", f"data.targets={targets}",
                         "data.depth=8", "train.max_steps=2", "train.accumulation=1"))
    run = tmp_path / "tiny.KD.f1.lr0.003.s42"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert state.finished and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows if "loss" in r)
    # the optimiser really stepped: the head and every layer moved; the frozen position embeddings did not
    before, after = weights(quiet_bert), weights(run / "model")
    moved = {name for name in before if not torch.equal(before[name], after[name])}
    layers = {name.split(".layer.")[1].split(".")[0] for name in moved if ".layer." in name}
    assert "classifier.weight" in moved and layers == {"0", "1"}
    assert "bert.embeddings.position_embeddings.weight" not in moved
    # and in the direction the loss asks for: lower on the training queries than the untrained model's
    assert _training_loss(run / "model", collection, loss) < _training_loss(quiet_bert, collection, loss)


def _training_loss(model_path: Path, collection: dict[str, Path], loss_name: str) -> float:
    """`loss_name` of a model on all training queries of the tiny KD set, targets by teacher rank (score)."""
    from crossrank.config import ModelConfig
    from crossrank.data.texts import read_corpus, read_topics
    from crossrank.models.encoding import PairTokenizer
    from crossrank.models.mono import MonoEncoder, load_tokenizer
    from crossrank.training.data import Example, collate
    from crossrank.training.losses import LOSSES
    from crossrank.training.examples import load_split

    root = collection["KD"].parent
    topics, passages = read_topics(root / "topics.tsv"), dict(read_corpus(root / "corpus.tsv"))
    examples = [Example(q.qid, q.docnos, q.scores) for q in load_split(collection["KD"], "train")]
    pairs = PairTokenizer(load_tokenizer(model_path), ModelConfig())
    batch = collate(examples, topics, passages, pairs)
    model = MonoEncoder.from_pretrained(model_path).eval()
    with torch.no_grad():
        flat = model(**pairs.pad_list(batch.pairs))[0]
        scores = torch.zeros(batch.mask.shape).masked_scatter(batch.mask, flat)
        return float(LOSSES[loss_name](scores, batch.targets, batch.mask))


# ---------------------------------------------------------------------------------------------------------
# Token-budget micro-batches (mono): length-sorted chunks, straight or cached score gradients


def _micro_batch(model_path: Path):
    """A micro-batch of 3 queries with 5, 2 and 4 candidates (padding in [Q, D]) of different lengths."""
    from crossrank.config import ModelConfig
    from crossrank.training.data import Example, collate
    from crossrank.models.encoding import PairTokenizer
    from crossrank.models.mono import load_tokenizer

    pairs = PairTokenizer(load_tokenizer(model_path), ModelConfig())
    topics = {"q1": "cat mat", "q2": "river fish and boat", "q3": "dog"}
    passages = {"a": "cat", "b": "cat mat the of cat mat on the mat with a cat", "c": "dog bark loudly",
                "d": "river fish and is river fish boat sea ship water", "e": "the a of", "f": "paris france"}
    examples = [Example("q1", list("abcde"), [2, 1, 0, 0, 0]), Example("q2", list("dc"), [1, 0]),
                Example("q3", list("cfab"), [3, 0, 1, 0])]
    return pairs, collate(examples, topics, passages, pairs)


def _gradients(model, run) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = run()
    return {"loss": loss.detach(), **{n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}}


@pytest.mark.parametrize("loss_name,checkpointing", [("lce", False), ("rank_net", False), ("lce", True)])
def test_chunked_gradients_equal_one_padded_batch(quiet_bert, loss_name, checkpointing):
    """straight, cached and auto (parts of whole queries: at 40 tokens one query cached and two straight, at 64
    two straight parts of several queries), in chunks of <= 40 / 64 padded tokens, give the gradient of one
    padded forward/backward (also with gradient checkpointing on)."""
    from crossrank.training.losses import LOSSES
    from crossrank.models.mono import MonoEncoder
    from crossrank.training.parts import mono_backward, plan_score_parts

    pairs, batch = _micro_batch(quiet_bert)
    model, loss_fn = MonoEncoder.from_pretrained(quiet_bert).train(), LOSSES[loss_name]
    if checkpointing:
        model.encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def one_batch() -> torch.Tensor:
        flat = model(**pairs.pad_list(batch.pairs))[0]  # [N]: all 11 pairs padded to the longest
        loss = loss_fn(torch.zeros(batch.mask.shape).masked_scatter(batch.mask, flat), batch.targets, batch.mask)
        (0.5 * loss).backward()
        return loss

    reference = _gradients(model, one_batch)
    shapes = []
    model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape[1:])),
                                    with_kwargs=True)
    lengths, per_query = [len(ids) for ids, _ in batch.pairs], batch.mask.sum(1).tolist()
    for mode, budget in (("straight", 40), ("cached", 40), ("auto", 40), ("auto", 64)):
        parts = plan_score_parts(lengths, per_query, budget, mode)
        assert len(parts) == {"straight": 1, "cached": 1, "auto": 3 if budget == 40 else 2}[mode]
        if mode == "auto":  # really mixed: 40 caches the first query only, 64 packs queries together
            assert [p.cached for p in parts] == ([True, False, False] if budget == 40 else [False, False])
        cfg = load_run_config([], [f"train.batch_tokens={budget}", f"train.score_grad={mode}"])
        shapes.clear()
        got = _gradients(model, lambda: mono_backward(model, model, batch, loss_fn, cfg, pairs, torch.device("cpu"),
                                                      contextlib.nullcontext(), lambda x: 0.5 * x))
        assert all(n * length <= budget for n, length in shapes) and len(shapes) >= 3  # really split
        # straight parts score each pair once; cached ones every pair twice but their first chunk (kept graph)
        assert sum(n for n, _ in shapes) == sum(
            2 * sum(map(len, p.chunks)) - len(p.chunks[0]) if p.cached else sum(map(len, p.chunks)) for p in parts)
        assert got.keys() == reference.keys()
        for name in reference:
            assert torch.allclose(got[name], reference[name], atol=1e-5, rtol=1e-4), (mode, budget, name)


def test_score_parts_pack_whole_queries_and_cache_only_a_query_too_big_alone():
    """plan_score_parts by hand: chunks of <= budget / 8 padded tokens inside a straight part, <= budget in a
    cached one; a part's chunks hold at most budget padded tokens together."""
    from crossrank.training.parts import plan_score_parts

    def plan(lengths, per_query, budget, mode="auto"):
        return [(p.chunks, p.cached) for p in plan_score_parts(lengths, per_query, budget, mode)]

    # 2 queries x 2 pairs of 4 tokens: chunks of 2 pairs (8 <= 64 / 8), one straight part
    assert plan([4, 4, 4, 4], [2, 2], 64) == [([[0, 1], [2, 3]], False)]
    # pairs of 8 tokens, one per chunk (> 32 / 8): each query 16 padded tokens; two fit 32, the third opens a part
    assert plan([8] * 6, [2, 2, 2], 32) == [([[0], [1], [2], [3]], False), ([[4], [5]], False)]
    # the middle query (3 x 30 = 90 > 64 padded tokens) is cached alone, in chunks of <= 64
    assert plan([10, 10, 30, 30, 30, 5], [2, 3, 1], 64) == [([[0], [1]], False), ([[2, 3], [4]], True),
                                                             ([[5]], False)]
    # straight / cached: the micro-batch is one part in chunks of <= budget, longest first (a chunk is padded to
    # its first pair: [30, 10] is 60 tokens, [30, 10, 10] would be 90)
    assert plan([10, 10, 30, 30, 30, 5], [2, 3, 1], 64, "cached") == [([[2, 3], [4, 0], [1, 5]], True)]
    assert plan([10, 10, 30, 30, 30, 5], [2, 3, 1], 64, "straight") == [([[2, 3], [4, 0], [1, 5]], False)]


@pytest.mark.parametrize("loss_name", ["lce", "bce", "rank_net", "list_net", "adr_mse", "margin_mse", "novelty"])
def test_every_loss_is_a_sum_over_queries(loss_name):
    """What packing queries into parts relies on: the gradient of the loss with zeros for every other query's
    scores is exactly that query's share of the whole micro-batch's gradient (so the parts' gradients add up to
    it), for every loss and for novelty-aware targets, with padding (lists of 4, 2 and 3)."""
    from crossrank.training.data import Batch
    from crossrank.training.losses import LOSSES
    from crossrank.training.parts import ranking_loss

    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    targets = torch.tensor([[3.0, 1, 0, 2], [0, 1, 0, 0], [2, 2, 0, 0]])
    clusters = torch.tensor([[0, 0, 1, 2], [0, 1, 0, 0], [0, 1, 1, 0]]) if loss_name == "novelty" else None
    batch = Batch({}, targets, mask, clusters=clusters)
    loss_fn = LOSSES["rank_net" if loss_name == "novelty" else loss_name]
    scores = torch.randn(3, 4, requires_grad=True)
    whole, = torch.autograd.grad(ranking_loss(scores, batch, loss_fn, torch.device("cpu")), scores)
    summed = torch.zeros_like(whole)
    for q in range(3):
        alone = torch.where(torch.arange(3)[:, None] == q, scores, torch.zeros(()))
        summed += torch.autograd.grad(ranking_loss(alone, batch, loss_fn, torch.device("cpu")), scores)[0]
    assert whole[mask].abs().sum() > 0 and torch.allclose(summed, whole, atol=1e-7)


def test_first_token_last_layer_trains_like_the_full_model(quiet_bert, tmp_path):
    """Training's `FirstTokenLayer` (last layer for [CLS] only): the same loss and gradients as the unmodified
    model, the same parameter names, and a checkpoint that loads as a plain transformers model."""
    from crossrank.training.losses import LOSSES
    from crossrank.models.mono import FirstTokenLayer, MonoEncoder, score_first_token_only

    pairs, batch = _micro_batch(quiet_bert)
    full, cut = (MonoEncoder.from_pretrained(quiet_bert).train() for _ in range(2))
    assert score_first_token_only(cut) and not score_first_token_only(cut)  # swapped once
    assert isinstance(cut.encoder.base_model.encoder.layer[-1], FirstTokenLayer)
    assert list(cut.state_dict()) == list(full.state_dict())

    def run(model):
        def step():
            flat = model(**pairs.pad_list(batch.pairs))[0]  # [N]
            loss = LOSSES["lce"](torch.zeros(batch.mask.shape).masked_scatter(batch.mask, flat), batch.targets,
                                 batch.mask)
            loss.backward()
            return loss
        return _gradients(model, step)

    reference, got = run(full), run(cut)
    assert got.keys() == reference.keys()
    for name in reference:
        assert torch.allclose(got[name], reference[name], atol=1e-6, rtol=1e-4), name
    cut.save_pretrained(tmp_path / "saved")
    reloaded = MonoEncoder.from_pretrained(tmp_path / "saved").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**pairs.pad_list(batch.pairs)), full.eval()(**pairs.pad_list(batch.pairs)),
                              atol=1e-6)


def test_cached_gradients_replay_dropout(tiny_bert):
    """With dropout on, the cached re-run must draw the masks of the no-grad pass: it then equals straight
    (same chunks, same seed), while another seed's dropout gives another gradient."""
    from crossrank.training.losses import LOSSES
    from crossrank.models.mono import MonoEncoder
    from crossrank.training.parts import mono_backward

    pairs, batch = _micro_batch(tiny_bert)
    model = MonoEncoder.from_pretrained(tiny_bert).train()

    def run(mode: str, seed: int) -> dict[str, torch.Tensor]:
        cfg = load_run_config([], ["train.batch_tokens=40", f"train.score_grad={mode}"])
        torch.manual_seed(seed)
        return _gradients(model, lambda: mono_backward(model, model, batch, LOSSES["lce"], cfg, pairs,
                                                       torch.device("cpu"), contextlib.nullcontext(), lambda x: x))

    straight, cached, other = run("straight", 1), run("cached", 1), run("cached", 2)
    assert all(torch.allclose(cached[k], straight[k], atol=1e-6) for k in straight)
    assert not all(torch.allclose(other[k], straight[k], atol=1e-6) for k in straight)


def test_micro_batch_far_larger_than_batch_tokens_trains_in_bounded_chunks(quiet_bert, collection, tmp_path,
                                                                          monkeypatch):
    """4 queries x 12 candidates in chunks of <= 48 padded tokens: every forward stays under the budget; each
    query (about 120 tokens) is too big for 48 alone, so each is a cached part."""
    from crossrank.training import loop as training
    from crossrank.training import parts

    shapes, plans, load, plan = [], [], training.load_model, parts.plan_score_parts

    def recording(*args, **kwargs):
        model, tokenizer = load(*args, **kwargs)
        model.register_forward_pre_hook(  # training forwards only (validation runs in eval mode)
            lambda m, args, kwargs: shapes.append((*kwargs["input_ids"].shape[1:], torch.is_grad_enabled()))
            if m.training else None,
            with_kwargs=True)
        return model, tokenizer

    monkeypatch.setattr(training, "load_model", recording)
    monkeypatch.setattr(parts, "plan_score_parts", lambda *args: plans.append(plan(*args)) or plans[-1])
    state = train(config(quiet_bert, collection["CL"], tmp_path, "CL", "data.num_negatives=11",
                         "train.queries_per_batch=4", "train.accumulation=1", "train.max_steps=2",
                         "train.batch_tokens=48", "train.eval_every=100"))
    assert state.finished and all(n * length <= 48 for n, length, _ in shapes) and len(shapes) > 2 * 2 * 4
    assert [[p.cached for p in parts] for parts in plans] == [[True] * 4] * 2  # 2 steps x 4 queries
    assert sum(n for n, _, grad in shapes if grad) == 2 * 4 * 12  # 2 steps x 48 pairs, each once with grad
    # and once more without grad before it, except each cached part's first chunk, which keeps its graph: the
    # grad forward right before the part's no-grad ones
    kept = [n for (n, _, grad), (_, _, next_grad) in zip(shapes, shapes[1:]) if grad and not next_grad]
    assert kept == [len(p.chunks[0]) for parts in plans for p in parts]
    assert sum(n for n, _, grad in shapes if not grad) == 2 * 4 * 12 - sum(kept)
    row = json.loads((tmp_path / "tiny.CL.f1.lr0.003.s42" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["pairs_per_s"] > 0 and row["tokens_per_s"] > row["pairs_per_s"] and row["eta_s"] >= 0


def test_validation_value_is_what_the_inference_engine_reports(quiet_bert, collection, tmp_path):
    """The number that selected model/ = re-ranking the validation lists with model/ through
    inference.score_candidates and evaluation.evaluate (what infer.py does)."""
    from crossrank.evaluation import metrics as evaluation
    from crossrank.training.data import load_training_data
    from crossrank.inference.candidates import Candidates
    from crossrank.inference.rerank import score_candidates
    from crossrank.models.loading import load_model

    cfg = config(quiet_bert, collection["CL"], tmp_path, "CL", "train.max_steps=3", "train.eval_every=3",
                 "eval.block_queries=3", "eval.batch_tokens=64")
    state = train(cfg)
    data, valid = load_training_data(cfg)
    model, pairs = load_model(tmp_path / "tiny.CL.f1.lr0.003.s42" / "model", cfg.model, torch.device("cpu"))
    run = score_candidates(model, pairs, Candidates({q.qid: list(zip(q.docnos, q.scores)) for q in valid},
                                                    data.topics, data.passages), cfg.eval)
    metric = evaluation.parse_metrics(["nDCG@10"], 1)[0]
    expected = evaluation.evaluate(run, {q.qid: q.judged for q in valid}, [metric]).means[str(metric)]
    assert state.best_step == 3 and state.best_metric == expected


def test_the_start_line_says_what_one_query_brings():
    """The CL objective's defaults (1 + 99 from the top 200) surprise: the start line spells them out."""
    from crossrank.config import DataConfig
    from crossrank.training.data import list_size

    assert list_size(DataConfig(sampling="single_relevant", num_negatives=99, depth=200)) == \
        "1 relevant + up to 99 negatives from the top 200"
    assert list_size(DataConfig(sampling="top", num_negatives=19)) == "the top 20 candidates"
    assert list_size(DataConfig(sampling="log_random", num_negatives=7, depth=100)) == \
        "8 log-random candidates from the top 100"
