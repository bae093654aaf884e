"""Fine-tuning a cross-encoder: one plain-PyTorch loop, `train(cfg)`, read top to bottom.

`model.kind` picks the model (`crossrank.models.loading.load_model`): `mono` (pointwise, one score per pair) or
`set-encoder` (listwise, `crossrank.models.set_encoder`: every query's list in one forward pass). They differ only in
how a micro-batch is scored, which the model's `listwise` attribute selects (`mono_backward`: parts of whole
queries within `train.batch_tokens`, in length-sorted chunks; `batch_loss`: whole lists); the loop, resume,
validation and checkpoints are the same.

    setup (processes, seeds, data, model, optimiser) -> resume from checkpoint/ if there is one -> loop:
    accumulate micro-batches -> clip -> step -> log -> validate (keep the best as model/) -> checkpoint

Outputs in the run folder (naming: `crossrank.training.naming`): `model/` (best by validation `train.select_metric`),
`checkpoint/` (latest resumable state), `metrics.jsonl`, `curve.png`, `crossrank.yaml`. Both model folders are
Hugging Face `save_pretrained` folders with the tokenizer and the resolved config.

Exact resume: the example stream is a function of (seed, cursor) (`crossrank.training.data.TrainingData`), the
learning rate a function of the step, and the checkpoint holds the weights, the AdamW moments, the AMP scaler
and every process's RNG states; rerunning the same command after SIGTERM/SIGUSR1 continues to the same weights
as an uninterrupted run.

Multi-GPU: start with `torchrun` (see ft-monoencoder.sh). Every process draws its own micro-batches from the
one stream; `train.accumulation` counts micro-steps over all processes, so the global batch
(`queries_per_batch x accumulation` queries) and the result do not depend on the number of GPUs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from crossrank import config as config_io
from crossrank.evaluation import metrics as evaluation
from crossrank.training import naming
from crossrank.config import ROOT, OptimConfig, RunConfig
from crossrank.training.data import TrainingData, list_size, load_training_data, training_folder
from crossrank.distributed import Distributed, lock_outputs, setup_distributed
from crossrank.data.outputs import refuse_overwriting_inputs
from crossrank.models.encoding import PairTokenizer, empty_query_warning
from crossrank.inference.candidates import Candidates
from crossrank.inference.rerank import score_candidates
from crossrank.errors import CrossrankError
from crossrank.data.runs import qid_order
from crossrank.training.losses import LOSSES
from crossrank.training.examples import TrainingQuery
from crossrank.models.loading import load_model
from crossrank.models.mono import check_model_source
from crossrank.models.precision import cpu_auto_precision, cpu_flags
from crossrank.training.checkpoint import TrainState, check_checkpoint, check_same_recipe, gather_rng, load_state, recover_folder, save_checkpoint, save_model, set_rng
from crossrank.training.parts import WithDuplicates, batch_loss, mono_backward
from crossrank.training.reporting import format_duration, log_row, open_reporters, plot_curve, truncate_metrics


INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)




def run_folder(cfg: RunConfig) -> Path:
    """The output folder: `train.output_dir`, or `<models_dir>/<name>` by `crossrank.training.naming` (with the
    training dataset when not the default and, for stage 2, the hash of the starting checkpoint)."""
    if cfg.train.output_dir:
        return _project_path(cfg.train.output_dir)
    chain = naming.objective_chain(cfg.train.objective, cfg.train.stage, cfg.train.previous)
    label = naming.model_label(cfg.model.name or cfg.model.path, cfg.data.novelty)
    start = naming.checkpoint_hash(initial_weights(cfg)) if cfg.train.stage == 2 else ""
    name = naming.run_name(label, chain, cfg.train.stage, cfg.optim.lr, cfg.train.seed, cfg.data.dataset, start)
    return _project_path(cfg.train.models_dir) / name


def initial_weights(cfg: RunConfig) -> str:
    """Stage 1: the backbone. Stage 2: `train.init_from`, else the stage-1 `model/` of the previous objective
    with the same backbone, whatever its seed (`train.previous_seed` and `train.previous_lr` narrow when
    several stage-1 runs match)."""
    if cfg.train.init_from:
        return str(_project_path(cfg.train.init_from))
    if cfg.train.stage == 1:
        if not cfg.model.path:
            raise CrossrankError("config: model.path is empty (expected a backbone: -c bert|electra|roberta|<path>)")
        return cfg.model.path
    previous = naming.objective_chain(cfg.train.objective, 2, cfg.train.previous)[:-1]
    seed = cfg.train.previous_seed if cfg.train.previous_seed >= 0 else None
    return str(naming.find_model(cfg.model.name or cfg.model.path, previous, 1, lr=cfg.train.previous_lr or None,
                                 seed=seed, models=_project_path(cfg.train.models_dir)))


def training_inputs(cfg: RunConfig) -> list[tuple[str, str]]:
    """What a run reads and its folder must never be or hold: the training folder with its texts, the model it
    starts from (`train.init_from`, set by `_setup` for stage 2), the backbone folder."""
    folder = training_folder(cfg)
    found = [("the training data folder (data.train)", str(folder))]
    meta = folder / "meta.yaml"
    if meta.is_file():
        from crossrank.data.datasets import resolve_source
        from crossrank.training.examples import load_meta

        found += [(f"the training {key} (named in {meta})", resolve_source(str(value)))
                  for key, value in load_meta(folder).items() if key in ("topics", "corpus") and value]
    found += [("train.init_from", cfg.train.init_from and str(_project_path(cfg.train.init_from)))]
    if cfg.model.path and Path(cfg.model.path).expanduser().exists():
        found.append(("model.path", cfg.model.path))
    return found


def _project_path(value: str) -> Path:
    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() else ROOT / path


def cpu_training_precision(requested: str) -> str:
    """`train.cpu_precision` made concrete: auto is bf16 where the CPU has it natively (`crossrank.models.precision`)."""
    return cpu_auto_precision(cpu_flags()) if requested == "auto" else requested


def lr_at(step: int, optim: OptimConfig, total: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup, then constant or linear decay to 0.
    A pure function of the step, so resuming needs no scheduler object."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    return optim.lr * max(0.0, (total - step) / max(1, total - optim.warmup_steps))


@dataclasses.dataclass
class Setup:
    """What every step of a run works with, built once by `_setup` (the handles, not the state that resumes)."""

    cfg: RunConfig
    ddp: Distributed
    data: TrainingData
    valid: list[TrainingQuery]
    folder: Path
    total_steps: int
    resume: bool  # checkpoint/ holds a state to continue from
    tokenizer: PreTrainedTokenizerBase
    raw_model: nn.Module  # the model itself (saved, validated, clipped)
    model: nn.Module  # what runs the forward: the same (stage 1: `WithDuplicates`), in DDP with several processes
    pair_tokenizer: PairTokenizer
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast: torch.autocast
    loss_fn: Callable

    @property
    def micro_steps(self) -> int:  # per process
        return self.cfg.train.accumulation // self.ddp.world

    @property
    def global_queries(self) -> int:  # per optimiser step
        return self.cfg.train.queries_per_batch * self.cfg.train.accumulation


@dataclasses.dataclass
class StepRecord:
    """One optimiser step's figures over all processes, from the step's one all-reduce."""

    loss: float  # mean over the step's micro-batches and processes
    pairs: int
    tokens: int
    stop: bool  # some process was asked to stop
    parts: dict[str, float]  # the parts of a composite loss (Set-Encoder stage 1), means like `loss`


def train(cfg: RunConfig) -> TrainState:
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.train.loss`; see the module docstring. The run folder is
    locked for the whole run (one writer; released when the run ends or its process dies)."""
    with contextlib.ExitStack() as held:
        return _train(cfg, held)


def _train(cfg: RunConfig, held: contextlib.ExitStack) -> TrainState:
    run = _setup(cfg, held)
    cfg, ddp = run.cfg, run.ddp
    state = _restore(run)
    if ddp.is_main:
        _open_run_folder(run, state)
    reporters = open_reporters(cfg, run.folder) if ddp.is_main else []
    with _signals_caught() as interrupted:
        run.model.train()
        progress = tqdm(total=run.total_steps, initial=state.step, disable=not ddp.is_main, desc="train",
                        unit="step")
        window = _new_window()
        loop_started, first_step = time.perf_counter(), state.step
        while state.step < run.total_steps:
            started = time.perf_counter()
            lr = lr_at(state.step, cfg.optim, run.total_steps)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            record = _reduce_step(*_accumulate(run, state), interrupted["signal"] is not None, ddp)
            _optimizer_step(run, record, state.step)
            state.step += 1
            state.cursor += run.global_queries
            progress.update(1)
            _add_to_window(window, record, time.perf_counter() - started)
            if ddp.is_main and (state.step % cfg.train.log_every == 0 or state.step == run.total_steps):
                # ETA from the wall time per step of this run so far: validation and checkpoints included
                per_step = (time.perf_counter() - loop_started) / (state.step - first_step)
                _log_window(run, state, window, lr, per_step, reporters, progress)
                window = _new_window()
            done = state.step == run.total_steps
            _validate(run, state, done, reporters)
            state.finished = done
            if done or record.stop or state.step % cfg.train.save_every == 0:
                _checkpoint(run, state)
            if record.stop and not done:
                if ddp.is_main:
                    print(f"\ninterrupted by {interrupted['signal'] or 'a signal to another process'} at step "
                          f"{state.step}: checkpoint saved in {run.folder / 'checkpoint'}; rerun the same command "
                          f"to resume")
                break
        progress.close()
    _finish(run, state, reporters)
    return state


def _setup(cfg: RunConfig, held: contextlib.ExitStack) -> Setup:
    """Processes, checks, data, the run folder (never an input; locked into `held`), the model (from checkpoint/
    when resuming) and its optimiser."""
    ddp = setup_distributed()
    if cfg.train.loss not in LOSSES:
        raise CrossrankError(f"config: train.loss is unknown (expected one of {', '.join(LOSSES)}, "
                             f"got {cfg.train.loss!r})")
    if cfg.train.accumulation % ddp.world:
        raise CrossrankError(f"config: train.accumulation={cfg.train.accumulation} is not divisible by the "
                             f"{ddp.world} processes (expected a multiple; the global batch is "
                             f"queries_per_batch x accumulation)")
    try:  # before any data is read or any output is touched
        evaluation.parse_metrics([cfg.train.select_metric], 1)
    except CrossrankError as e:
        origin = getattr(cfg, "_origins", {}).get("train.select_metric", "config")
        raise CrossrankError(f"{origin}: train.select_metric: {e}") from None
    cuda = ddp.device.type == "cuda"
    if ddp.device.type == "cpu" and cpu_training_precision(cfg.train.cpu_precision) == "bf16":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)  # opt-in (train.cpu_precision): fast with AMX
    else:
        autocast = torch.autocast("cuda", dtype=torch.bfloat16 if cfg.train.precision == "bf16" else torch.float16,
                                  enabled=cuda and cfg.train.precision != "fp32")
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and cfg.train.precision == "fp16")

    data, valid = load_training_data(cfg)
    # the start this command asks for (stage 2: looked up now), recorded in the config, so that resuming a
    # checkpoint that started elsewhere is refused by the recipe check below before anything is loaded
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=initial_weights(cfg)))
    folder = run_folder(cfg)
    refuse_overwriting_inputs([], training_inputs(cfg), [("train.output_dir" if cfg.train.output_dir else
                                                          "the run folder", folder)])
    lock_outputs(held, [folder], ddp)  # before anything in it is read, recovered or written
    global_queries = cfg.train.queries_per_batch * cfg.train.accumulation
    total_steps = cfg.train.max_steps or max(1, cfg.train.epochs * len(data) // global_queries)
    resume = recover_folder(folder / "checkpoint")
    if resume:
        check_checkpoint(folder / "checkpoint")
        check_same_recipe(cfg, folder / "checkpoint" / "crossrank.yaml")
    init = str(folder / "checkpoint") if resume else cfg.train.init_from
    if not resume:  # complete, an encoder, with its tokenizer: before the run folder is opened
        check_model_source(init)

    torch.manual_seed(cfg.train.seed)  # the same fresh head on every process
    raw_model, pair_tokenizer = load_model(init, cfg.model, ddp.device, training=True,
                                           duplicate=cfg.data.duplicate)
    forward = WithDuplicates(raw_model) if cfg.data.duplicate else raw_model  # stage 1: the duplicate head trains
    model = DistributedDataParallel(forward, device_ids=[ddp.device] if cuda else None) if ddp.world > 1 else forward
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    used = {q.qid: data.topics[q.qid] for q in [*data.queries, *valid]}
    warning = empty_query_warning(pair_tokenizer, used, cfg.data.train or cfg.data.dataset)
    if warning and ddp.is_main:
        print(warning, file=sys.stderr)
    return Setup(cfg, ddp, data, valid, folder, total_steps, resume, pair_tokenizer.tokenizer, raw_model, model,
                 pair_tokenizer, optimizer, scaler, autocast, LOSSES[cfg.train.loss])


def _restore(run: Setup) -> TrainState:
    """The saved optimiser, scaler, TrainState and RNG states when resuming; else a fresh state and seeds."""
    if not run.resume:
        random.seed(run.cfg.train.seed + run.ddp.rank)
        torch.manual_seed(run.cfg.train.seed + run.ddp.rank)  # dropout differs per process, as it would per batch
        return TrainState()
    saved = load_state(run.folder / "checkpoint" / "state.pt", run.ddp.device)
    run.optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"]:  # empty when saved by a disabled (non-fp16) scaler
        run.scaler.load_state_dict(saved["scaler"])
    state = TrainState(**saved["state"])
    set_rng(state.rng, run.ddp)
    return state


def _open_run_folder(run: Setup, state: TrainState) -> None:
    """Main process: the log cut back to the checkpoint, the resolved config, and what the run will do."""
    truncate_metrics(run.folder / "metrics.jsonl", state.step)  # first: a damaged log stops before any write
    run.folder.mkdir(parents=True, exist_ok=True)
    config_io.save(run.cfg, run.folder / "crossrank.yaml")
    kept = f", {run.data.without_positive} kept without a positive" if run.data.without_positive else ""
    train, data = run.cfg.train, run.cfg.data
    print(f"training {run.folder.name}: {len(run.data)} queries ({run.data.dropped} without a usable example "
          f"dropped{kept}), {len(run.valid)} validation queries, {run.total_steps} steps of {run.global_queries} "
          f"queries (-b {train.queries_per_batch} x train.accumulation {train.accumulation}, the micro-steps of all "
          f"{run.ddp.world} process(es) on {run.ddp.device}), {list_size(data)} per query"
          + (f", resuming at step {state.step}" if run.resume else ""))


def _accumulate(run: Setup, state: TrainState) -> tuple[torch.Tensor, int, int, dict[str, torch.Tensor]]:
    """This process's micro-batches of the step, backpropagated into .grad: (mean loss, pairs, tokens, parts)."""
    cfg, ddp, micro_steps = run.cfg, run.ddp, run.micro_steps
    listwise = run.raw_model.listwise  # Set-Encoder: whole lists per forward
    loss_sum, pair_count, token_count, part_sums = torch.zeros((), device=ddp.device), 0, 0, {}
    for micro in range(micro_steps):
        # micro-batches are interleaved over processes: the step's examples are the same for any world size
        start = state.cursor + (micro * ddp.world + ddp.rank) * cfg.train.queries_per_batch
        batch = run.data.batch(start, cfg.train.queries_per_batch, run.pair_tokenizer, listwise)
        last = micro == micro_steps - 1
        if listwise:
            with run.model.no_sync() if ddp.world > 1 and not last else contextlib.nullcontext():
                with run.autocast:  # the forward only; backward runs in the dtypes autocast chose
                    loss, parts = batch_loss(run.model, batch, run.loss_fn, cfg, ddp.device)
                run.scaler.scale(loss / micro_steps).backward()
        else:  # several backwards per micro-batch: only the step's very last one runs through DDP (syncs)
            loss, parts = mono_backward(run.raw_model, run.model if last else run.raw_model, batch, run.loss_fn,
                                        cfg, run.pair_tokenizer, ddp.device, run.autocast,
                                        lambda x: run.scaler.scale(x / micro_steps)), {}
        loss_sum += loss.detach() / micro_steps
        part_sums = {k: part_sums.get(k, 0.0) + v.detach() / micro_steps for k, v in parts.items()}
        pair_count += batch.num_pairs
        token_count += batch.num_tokens
    return loss_sum, pair_count, token_count, part_sums


def _reduce_step(loss_sum: torch.Tensor, pair_count: int, token_count: int, part_sums: dict[str, torch.Tensor],
                 stop: bool, ddp: Distributed) -> StepRecord:
    """One collective per step: every process's mean loss, pairs, tokens, parts and stop request, summed."""
    device = ddp.device
    flags = torch.stack([loss_sum, torch.tensor(float(pair_count), device=device),
                         torch.tensor(float(stop), device=device), torch.tensor(float(token_count), device=device),
                         *part_sums.values()])
    if ddp.world > 1:
        dist.all_reduce(flags)
    parts = {name: flags[4 + i].item() / ddp.world for i, name in enumerate(part_sums)}
    return StepRecord(loss=flags[0].item() / ddp.world, pairs=int(flags[1].item()), tokens=int(flags[3].item()),
                      stop=flags[2].item() > 0, parts=parts)


def _optimizer_step(run: Setup, record: StepRecord, step: int) -> None:
    """Refuse a diverged loss, then clip, step and clear the gradients."""
    if not math.isfinite(record.loss):
        raise CrossrankError(f"step {step + 1}: the loss is {record.loss} (training diverged; the last "
                             f"checkpoint is intact: lower optim.lr (now {run.cfg.optim.lr:g}), keep "
                             f"optim.grad_clip, or use train.precision=fp32)")
    if run.cfg.optim.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), run.cfg.optim.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)


def _new_window() -> dict:
    """Sums over the steps since the last log row."""
    return {"loss": 0.0, "pairs": 0, "tokens": 0, "time": 0.0, "steps": 0, "parts": {}}


def _add_to_window(window: dict, record: StepRecord, seconds: float) -> None:
    window["loss"] += record.loss
    for name, value in record.parts.items():
        window["parts"][name] = window["parts"].get(name, 0.0) + value
    window["pairs"] += record.pairs
    window["tokens"] += record.tokens
    window["time"] += seconds
    window["steps"] += 1


def _log_window(run: Setup, state: TrainState, window: dict, lr: float, per_step: float, reporters: list,
                progress: tqdm) -> None:
    """One metrics row (means and rates over the window) to metrics.jsonl, the reporters and the bar."""
    row = {"step": state.step, "epoch": round(state.cursor / len(run.data), 4), "lr": lr,
           "loss": window["loss"] / window["steps"], "pairs_per_s": window["pairs"] / window["time"],
           "tokens_per_s": window["tokens"] / window["time"],
           "eta_s": round(per_step * (run.total_steps - state.step), 1),
           **{k: v / window["steps"] for k, v in window["parts"].items()}}
    log_row(run.folder, row, reporters)
    progress.set_postfix(loss=f"{row['loss']:.4f}", pairs_s=f"{row['pairs_per_s']:.1f}",
                         tok_s=f"{row['tokens_per_s']:.0f}", eta=format_duration(row["eta_s"]))


def validation_due(step: int, train_cfg) -> bool:
    """After optimiser step `step` (1-based): `train.eval_unit=step` every `eval_every` steps;
    `micro_batch` whenever a multiple of `eval_every` micro-batches (`accumulation` per step, over all
    processes: the seed's one-GPU count) was crossed, as Lightning's integer val_check_interval."""
    every = train_cfg.eval_every
    if train_cfg.eval_unit == "micro_batch":
        a = train_cfg.accumulation
        return step * a // every > (step - 1) * a // every
    return step % every == 0


def _validate(run: Setup, state: TrainState, done: bool, reporters: list) -> None:
    """On validation steps: score the validation queries, log the metric and save a new best as model/.
    Without validation queries the last weights are the model."""
    cfg, ddp = run.cfg, run.ddp
    if run.valid and (validation_due(state.step, cfg.train) or done):
        value = validation_value(run.raw_model, run.pair_tokenizer, run.valid, run.data, cfg, ddp)
        run.model.train()
        if ddp.is_main:
            log_row(run.folder, {"step": state.step, f"valid_{cfg.train.select_metric}": value}, reporters)
        if value > state.best_metric:
            state.best_metric, state.best_step = value, state.step
            if ddp.is_main:
                save_model(run.raw_model, run.tokenizer, cfg, run.folder / "model", state)
    if done and not run.valid and ddp.is_main:  # nothing to select by: the last weights are the model
        state.best_step = state.step
        save_model(run.raw_model, run.tokenizer, cfg, run.folder / "model", state)


def _checkpoint(run: Setup, state: TrainState) -> None:
    """Every process's RNG states into the state, then (main process) checkpoint/ and curve.png."""
    state.rng = gather_rng(run.ddp)
    if run.ddp.is_main:
        save_checkpoint(run.raw_model, run.tokenizer, run.optimizer, run.scaler, run.cfg, state,
                        run.folder / "checkpoint")
        plot_curve(run.folder, run.cfg.train.select_metric)


def _finish(run: Setup, state: TrainState, reporters: list) -> None:
    for reporter in reporters:
        reporter.close()
    if run.ddp.is_main and state.finished:
        print(f"done: {run.folder / 'model'} (step {state.best_step}"
              + (f", validation {run.cfg.train.select_metric} {state.best_metric:.4f})" if run.valid else ")"))
    if run.ddp.world > 1:
        dist.barrier()
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Validation


@torch.no_grad()
def validation_value(model: nn.Module, tokenizer: PairTokenizer, valid: list[TrainingQuery], data: TrainingData,
                     cfg: RunConfig, ddp: Distributed) -> float:
    """`train.select_metric` of the model on the validation queries by the one evaluation path, infer.py's: scores
    from the inference engine (`inference.score_candidates`: its blocks of `eval.block_queries`, batches of
    `eval.batch_tokens`, `eval.precision` and score rounding; each process scores a share of the blocks), the
    metric from `evaluation.evaluate` (trec_eval's tie order, binary measures at the data's rel_level).
    Scores that are all equal mean the model collapsed: that stops the run."""
    model.eval()
    qids = sorted((q.qid for q in valid), key=qid_order)  # the blocks infer.py would form over these queries
    blocks = [qids[i: i + cfg.eval.block_queries] for i in range(0, len(qids), cfg.eval.block_queries)]
    mine = {qid for block in blocks[ddp.rank:: ddp.world] for qid in block}
    candidates = Candidates({q.qid: list(zip(q.docnos, q.scores)) for q in valid if q.qid in mine}, data.topics,
                            data.passages)
    run = score_candidates(model, tokenizer, candidates, cfg.eval) if mine else {}
    if ddp.world > 1:
        shares = [None] * ddp.world
        dist.all_gather_object(shares, run)
        run = {qid: ranking for share in shares for qid, ranking in share.items()}
    values = [s for ranking in run.values() for _, s in ranking]
    if max(values) - min(values) <= 1e-6 * max(1.0, abs(max(values))):
        raise CrossrankError(f"validation: all {len(values)} scores are {values[0]:.6g} (the model collapsed to a "
                             f"constant; lower optim.lr (now {cfg.optim.lr:g}) or check the data's targets)")
    metric = evaluation.parse_metrics([cfg.train.select_metric], data.data.relevant_level or 1)[0]
    return float(evaluation.evaluate(run, {q.qid: q.judged for q in valid}, [metric]).means[str(metric)])


@contextlib.contextmanager
def _signals_caught():
    """SIGTERM/SIGUSR1 (SLURM preemption, torchrun shutdown) set a flag; the loop checkpoints and stops at the
    end of the current step. The previous handlers come back however the loop ends."""
    flag = {"signal": None}

    def handler(signum, frame):
        flag["signal"] = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, handler) for sig in INTERRUPTING_SIGNALS}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
