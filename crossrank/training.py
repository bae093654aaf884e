"""Fine-tuning a cross-encoder: one plain-PyTorch loop, `train(cfg)`, read top to bottom.

`model.kind` picks the model (`crossrank.scorer.load_scorer`): `mono` (pointwise, one score per pair) or
`set-encoder` (listwise, `crossrank.set_encoder`: every query's list in one forward pass). They differ only in
how a micro-batch is scored, which the model's `listwise` attribute selects (`mono_backward`: parts of whole
queries within `train.batch_tokens`, in length-sorted chunks; `batch_loss`: whole lists); the loop, resume,
validation and checkpoints are the same.

    setup (processes, seeds, data, model, optimiser) -> resume from checkpoint/ if there is one -> loop:
    accumulate micro-batches -> clip -> step -> log -> validate (keep the best as model/) -> checkpoint

Outputs in the run folder (naming: `crossrank.naming`): `model/` (best by validation `train.select_metric`),
`checkpoint/` (latest resumable state), `metrics.jsonl`, `curve.png`, `crossrank.yaml`. Both model folders are
Hugging Face `save_pretrained` folders with the tokenizer and the resolved config.

Exact resume: the example stream is a function of (seed, cursor) (`crossrank.data.TrainingData`), the
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
import json
import math
import os
import pickle
import random
import shutil
import signal
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
from crossrank import evaluation
from crossrank import naming
from crossrank.config import ROOT, OptimConfig, RunConfig
from crossrank.data import Batch, TrainingData, load_training_data
from crossrank.distributed import Distributed, setup_distributed
from crossrank.encoding import PairTokenizer, load_set_tokenizer
from crossrank.inference import Candidates, plan_batches, score_candidates
from crossrank.io import FILE_MODE, CrossrankError, atomic_write, qid_order
from crossrank.losses import LOSSES
from crossrank.models import check_model_folder, score_first_token_only
from crossrank.novelty import duplicate_bce, novelty_targets
from crossrank.precision import cpu_auto_precision, cpu_flags
from crossrank.preprocessing import TrainingQuery
from crossrank.scorer import load_scorer
from crossrank.set_encoder import ListScores

INTERRUPTING_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# A straight part's chunks hold at most train.batch_tokens / this padded tokens each: small enough that a short
# pair is rarely padded to a long one, large enough for efficient GEMMs. Measured (bench/training.py, KD 16 x 20,
# DL19 text, 2 CPUs, batch_tokens 4096): / 2 11.3, / 4 12.4-12.6, / 8 12.8-13.9, / 16 11.5 pairs/s.
STRAIGHT_CHUNK_SHARE = 8


@dataclasses.dataclass
class TrainState:
    """Everything besides weights, optimiser and scaler that a resumed run needs (saved as state.pt)."""

    step: int = 0  # optimiser steps done
    cursor: int = 0  # examples consumed from the training stream, over all processes
    best_metric: float = -math.inf  # best validation value so far (train.select_metric)
    best_step: int = -1  # the step model/ was saved at
    finished: bool = False
    rng: list = dataclasses.field(default_factory=list)  # per process: python, torch CPU (and CUDA) RNG states


def run_folder(cfg: RunConfig) -> Path:
    """The output folder: `train.output_dir`, or `<models_dir>/<name>` by `crossrank.naming` (with the
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


def _project_path(value: str) -> Path:
    path = Path(os.path.expandvars(value)).expanduser()
    return path if path.is_absolute() else ROOT / path


def lr_at(step: int, optim: OptimConfig, total: int) -> float:
    """Learning rate of optimiser step `step` (0-based): linear warmup, then constant or linear decay to 0.
    A pure function of the step, so resuming needs no scheduler object."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    return optim.lr * max(0.0, (total - step) / max(1, total - optim.warmup_steps))


def cpu_training_precision(requested: str) -> str:
    """`train.cpu_precision` made concrete: auto is bf16 where the CPU has it natively (`crossrank.precision`)."""
    return cpu_auto_precision(cpu_flags()) if requested == "auto" else requested


def load_model(path: str, cfg: RunConfig) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Model and tokenizer to train from `path` (backbone, stage-1 model or checkpoint), by `load_scorer`.
    Outside stage 1 the Set-Encoder's duplicate head gets no loss, so it is frozen (DDP then needs no
    find_unused_parameters). A mono model's last layer runs for [CLS] only (`FirstTokenLayer`): the head reads
    nothing else, so the gradient is the same for ~1/7 less work."""
    model, tokenizer = load_scorer(path, cfg.model, training=True)
    if model.listwise:
        model.duplicate.requires_grad_(cfg.data.duplicate)
    else:
        score_first_token_only(model)
    return model, tokenizer


class WithDuplicates(nn.Module):
    """A Set-Encoder whose forward is `scores_and_duplicates`: what stage 1 (`data.duplicate`) trains through.
    DDP all-reduces the gradients of what runs through the forward it wraps, so the duplicate head's logits
    must come from a forward, not from a method called beside it."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: torch.Tensor) -> ListScores:
        return self.model.scores_and_duplicates(**inputs)


def batch_loss(model: nn.Module, batch: Batch, loss_fn, cfg: RunConfig, device: torch.device
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one Set-Encoder micro-batch, and its parts (for the log): all lists in one call, scores
    [Q, D]; in stage 1 (`model` is `WithDuplicates`) also the duplicate head's logits [Q, D]: loss = ranking
    loss + train.duplicate_weight x duplicate BCE. (Mono micro-batches go through `mono_backward`.)"""
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    if batch.duplicates is None:
        return ranking_loss(model(**inputs).float(), batch, loss_fn, device), {}
    out = model(**inputs)
    loss = ranking_loss(out.scores.float(), batch, loss_fn, device)
    duplicate = duplicate_bce(out.duplicate_logits.float(), batch.duplicates.to(device), batch.mask.to(device))
    return loss + cfg.train.duplicate_weight * duplicate, {f"loss_{cfg.train.loss}": loss,
                                                          "loss_duplicate_bce": duplicate}


def ranking_loss(scores: torch.Tensor, batch: Batch, loss_fn, device: torch.device) -> torch.Tensor:
    """`loss_fn` on the [Q, D] scores of a micro-batch. It sees `batch.ranked`, which leaves out an inserted
    duplicate, so a CL list keeps exactly one positive. With data.novelty the targets become novelty-aware
    first (NA-RankNet when train.loss=rank_net)."""
    mask, targets = batch.mask.to(device), batch.targets.to(device)
    ranked = batch.ranked.to(device) if batch.ranked is not None else mask
    if batch.clusters is not None:
        targets = novelty_targets(scores, targets, batch.clusters.to(device), ranked)
    return loss_fn(scores, targets, ranked)


@dataclasses.dataclass
class ScorePart:
    """Whole queries of a micro-batch that are backpropagated together: their pairs (indices into
    `batch.pairs`) in length-sorted chunks, and whether the gradient reaches them straight or cached."""

    chunks: list[list[int]]
    cached: bool


def plan_score_parts(lengths: list[int], pairs_per_query: list[int], batch_tokens: int, score_grad: str
                     ) -> list[ScorePart]:
    """How `mono_backward` scores a micro-batch (`lengths`: tokens of each pair, in `batch.pairs` order).

    straight / cached: the whole micro-batch is one part, in chunks of at most `batch_tokens` padded tokens.
    auto: consecutive queries are packed into parts whose graphs fit `batch_tokens` padded tokens together (in
    chunks of at most batch_tokens / `STRAIGHT_CHUNK_SHARE`) and run straight: every listwise loss is a sum over
    queries, so a part's gradient needs no other part's scores, and nothing runs twice. A query that does not
    fit alone is a cached part of its own."""
    if score_grad != "auto":
        return [ScorePart(plan_batches(lengths, [], batch_tokens), score_grad == "cached")]

    def chunks_of(rows: list[int], budget: int) -> list[list[int]]:
        return [[rows[i] for i in chunk] for chunk in plan_batches([lengths[i] for i in rows], [], budget)]

    def padded(chunks: list[list[int]]) -> int:
        return sum(len(chunk) * max(lengths[i] for i in chunk) for chunk in chunks)

    small = batch_tokens // STRAIGHT_CHUNK_SHARE  # a straight part's chunk budget
    parts: list[ScorePart] = []
    open_rows: list[int] = []  # the straight part being packed, and its chunks
    open_chunks: list[list[int]] = []
    start = 0
    for count in pairs_per_query:
        rows, start = list(range(start, start + count)), start + count
        alone = chunks_of(rows, small)
        if padded(alone) > batch_tokens:  # too big alone: a cached part
            parts += [ScorePart(open_chunks, False)] if open_rows else []
            parts.append(ScorePart(chunks_of(rows, batch_tokens), True))
            open_rows, open_chunks = [], []
            continue
        joined = chunks_of(open_rows + rows, small)
        if padded(joined) > batch_tokens:
            parts.append(ScorePart(open_chunks, False))
            open_rows, open_chunks = rows, alone
        else:
            open_rows, open_chunks = open_rows + rows, joined
    return parts + ([ScorePart(open_chunks, False)] if open_rows else [])


def mono_backward(model: nn.Module, final: nn.Module, batch: Batch, loss_fn, cfg: RunConfig,
                  tokenizer: PairTokenizer, device: torch.device, autocast, scale) -> torch.Tensor:
    """Score one mono micro-batch, backpropagate `scale(loss)` into the weights' .grad, return the loss.

    The pairs are sorted by length and padded per chunk (`plan_batches`, as inference batches them), so short
    pairs are not padded to the longest one of the micro-batch; the loss sees all [Q, D] scores of a part's
    queries at once (`plan_score_parts`). A straight part keeps its chunks' graphs and backpropagates once. A
    cached part (GradCache, Gao et al., RepL4NLP 2021, arXiv:2101.06983) runs every chunk but the first once
    without grad, takes the loss gradient w.r.t. the scores, and runs each chunk (again) with grad and
    `backward(its score gradient)`: the same gradient, with the memory of one chunk. The RNG state is replayed per
    chunk, so dropout in the re-run is the dropout of the first pass.
    A part's loss is the micro-batch's loss with zeros for the other parts' scores: the losses are sums over
    queries with a score-independent normaliser (`crossrank.losses`), so its gradient is the part's exact share.
    `final` runs the very last forward (the DDP wrapper when this backward must all-reduce), `model` the rest."""
    lengths = [len(ids) for ids, _ in batch.pairs]
    parts = plan_score_parts(lengths, batch.mask.sum(1).tolist(), cfg.train.batch_tokens, cfg.train.score_grad)
    mask = batch.mask.to(device)
    scores = torch.zeros(mask.shape, device=device)  # [Q, D], filled part by part (detached): the logged loss
    position = mask.flatten().nonzero().squeeze(1)  # pair i -> its flat index in [Q, D]
    for p, part in enumerate(parts):
        where = position[torch.tensor([i for chunk in part.chunks for i in chunk], device=device)]  # chunk order

        def loss_of(flat: torch.Tensor) -> torch.Tensor:  # flat [n] in chunk order -> the part's loss
            part_scores = torch.zeros_like(scores).flatten().index_put((where,), flat).view(mask.shape)
            return ranking_loss(part_scores, batch, loss_fn, device)

        last = final if p == len(parts) - 1 else model
        flat = _part_backward(model, last, part, batch, tokenizer, device, autocast, lambda f: scale(loss_of(f)))
        scores.view(-1)[where] = flat
    return ranking_loss(scores, batch, loss_fn, device)


def _part_backward(model: nn.Module, final: nn.Module, part: ScorePart, batch: Batch, tokenizer: PairTokenizer,
                   device: torch.device, autocast, scaled_loss: Callable[[torch.Tensor], torch.Tensor]
                   ) -> torch.Tensor:
    """Backpropagate `scaled_loss` of one part's scores [n] (chunk order); return them, detached."""
    nets = [model] * (len(part.chunks) - 1) + [final]
    inputs = [tokenizer.pad_list([batch.pairs[i] for i in rows]) for rows in part.chunks]  # [1, n_k, L_k]

    def forward(k: int) -> torch.Tensor:  # [n_k] scores of chunk k, scored as one list [1, n_k]
        with autocast:
            return nets[k](**{key: v.to(device) for key, v in inputs[k].items()})[0].float()

    if not part.cached:
        flat = torch.cat([forward(k) for k in range(len(part.chunks))])
        scaled_loss(flat).backward()
        return flat.detach()
    # The first chunk keeps its graph (one chunk's memory, as in the re-runs; the longest, so the largest
    # saving), the others run without grad; only the very last forward may run through DDP (`final`)
    states = [_chunk_rng(device)]
    kept = forward(0)
    with torch.no_grad():
        flat = [kept.detach()]
        for k in range(1, len(part.chunks)):
            states.append(_chunk_rng(device))
            flat.append(forward(k))
    flat = torch.cat(flat).requires_grad_()  # [n]: a leaf, so the loss's backward stops at the scores
    scaled_loss(flat).backward()
    grads = flat.grad.split([len(rows) for rows in part.chunks])  # [n_k] each
    kept.backward(grads[0])
    after = _chunk_rng(device)
    for k in range(1, len(part.chunks)):
        _chunk_rng(device, states[k])
        forward(k).backward(grads[k])
    _chunk_rng(device, after)  # continue from where the first pass ended, as a straight run would
    return flat.detach()


def _chunk_rng(device: torch.device, state: tuple | None = None) -> tuple | None:
    """Get (state=None) or set the RNG states that dropout draws from on `device`."""
    cuda = device.type == "cuda"
    if state is None:
        return torch.get_rng_state(), torch.cuda.get_rng_state(device) if cuda else None
    torch.set_rng_state(state[0])
    if cuda:
        torch.cuda.set_rng_state(state[1], device)
    return None


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
    """Fine-tune `cfg.model` on `cfg.data` with `cfg.train.loss`; see the module docstring."""
    run = _setup(cfg)
    cfg, ddp = run.cfg, run.ddp
    state = _restore(run)
    if ddp.is_main:
        _open_run_folder(run, state)
    reporters = _open_reporters(cfg, run.folder) if ddp.is_main else []
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


def _setup(cfg: RunConfig) -> Setup:
    """Processes, checks, data, the run folder, the model (from checkpoint/ when resuming) and its optimiser."""
    ddp = setup_distributed()
    if cfg.train.loss not in LOSSES:
        raise CrossrankError(f"config: train.loss is unknown (expected one of {', '.join(LOSSES)}, "
                             f"got {cfg.train.loss!r})")
    if cfg.train.accumulation % ddp.world:
        raise CrossrankError(f"config: train.accumulation={cfg.train.accumulation} is not divisible by the "
                             f"{ddp.world} processes (expected a multiple; the global batch is "
                             f"queries_per_batch x accumulation)")
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
    global_queries = cfg.train.queries_per_batch * cfg.train.accumulation
    total_steps = cfg.train.max_steps or max(1, cfg.train.epochs * len(data) // global_queries)
    resume = _recover_folder(folder / "checkpoint")
    if resume:
        _check_checkpoint(folder / "checkpoint")
        _check_same_recipe(cfg, folder / "checkpoint" / "crossrank.yaml")
    init = str(folder / "checkpoint") if resume else cfg.train.init_from

    torch.manual_seed(cfg.train.seed)  # the same fresh head on every process
    raw_model, tokenizer = load_model(init, cfg)
    raw_model.to(ddp.device)
    forward = WithDuplicates(raw_model) if cfg.data.duplicate else raw_model  # stage 1: the duplicate head trains
    model = DistributedDataParallel(forward, device_ids=[ddp.device] if cuda else None) if ddp.world > 1 else forward
    optimizer = torch.optim.AdamW(raw_model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    return Setup(cfg, ddp, data, valid, folder, total_steps, resume, tokenizer, raw_model, model,
                 PairTokenizer(tokenizer, cfg.model), optimizer, scaler, autocast, LOSSES[cfg.train.loss])


def _restore(run: Setup) -> TrainState:
    """The saved optimiser, scaler, TrainState and RNG states when resuming; else a fresh state and seeds."""
    if not run.resume:
        random.seed(run.cfg.train.seed + run.ddp.rank)
        torch.manual_seed(run.cfg.train.seed + run.ddp.rank)  # dropout differs per process, as it would per batch
        return TrainState()
    saved = _load_state(run.folder / "checkpoint" / "state.pt", run.ddp.device)
    run.optimizer.load_state_dict(saved["optimizer"])
    if saved["scaler"]:  # empty when saved by a disabled (non-fp16) scaler
        run.scaler.load_state_dict(saved["scaler"])
    state = TrainState(**saved["state"])
    _set_rng(state.rng, run.ddp)
    return state


def _open_run_folder(run: Setup, state: TrainState) -> None:
    """Main process: the log cut back to the checkpoint, the resolved config, and what the run will do."""
    _truncate_metrics(run.folder / "metrics.jsonl", state.step)  # first: a damaged log stops before any write
    run.folder.mkdir(parents=True, exist_ok=True)
    config_io.save(run.cfg, run.folder / "crossrank.yaml")
    print(f"training {run.folder.name}: {len(run.data)} queries ({run.data.dropped} without a usable example "
          f"dropped), {len(run.valid)} validation queries, {run.total_steps} steps of {run.global_queries} queries, "
          f"{run.ddp.world} process(es) on {run.ddp.device}"
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
    _log(run.folder, row, reporters)
    progress.set_postfix(loss=f"{row['loss']:.4f}", pairs_s=f"{row['pairs_per_s']:.1f}",
                         tok_s=f"{row['tokens_per_s']:.0f}", eta=_duration(row["eta_s"]))


def _validate(run: Setup, state: TrainState, done: bool, reporters: list) -> None:
    """On validation steps: score the validation queries, log the metric and save a new best as model/.
    Without validation queries the last weights are the model."""
    cfg, ddp = run.cfg, run.ddp
    if run.valid and (state.step % cfg.train.eval_every == 0 or done):
        value = evaluate(run.raw_model, run.pair_tokenizer, run.valid, run.data, cfg, ddp)
        run.model.train()
        if ddp.is_main:
            _log(run.folder, {"step": state.step, f"valid_{cfg.train.select_metric}": value}, reporters)
        if value > state.best_metric:
            state.best_metric, state.best_step = value, state.step
            if ddp.is_main:
                save_model(run.raw_model, run.tokenizer, cfg, run.folder / "model", state)
    if done and not run.valid and ddp.is_main:  # nothing to select by: the last weights are the model
        state.best_step = state.step
        save_model(run.raw_model, run.tokenizer, cfg, run.folder / "model", state)


def _checkpoint(run: Setup, state: TrainState) -> None:
    """Every process's RNG states into the state, then (main process) checkpoint/ and curve.png."""
    state.rng = _gather_rng(run.ddp)
    if run.ddp.is_main:
        save_checkpoint(run.raw_model, run.tokenizer, run.optimizer, run.scaler, run.cfg, state,
                        run.folder / "checkpoint")
        _plot(run.folder, run.cfg.train.select_metric)


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
def evaluate(model: nn.Module, tokenizer: PairTokenizer, valid: list[TrainingQuery], data: TrainingData,
             cfg: RunConfig, ddp: Distributed) -> float:
    """`train.select_metric` of the model on the validation queries, computed as infer.py computes it: scores
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


# ---------------------------------------------------------------------------------------------------------
# Saving: every folder is written under a temporary name, then swapped in with renames


def save_model(model: nn.Module, tokenizer, cfg: RunConfig, folder: Path, state: TrainState) -> None:
    """A Hugging Face folder (safetensors + tokenizer) with crossrank.yaml and which step it is."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_io.save(cfg, tmp / "crossrank.yaml")
        selected = {"step": state.step, "metric": cfg.train.select_metric,
                    "value": state.best_metric if math.isfinite(state.best_metric) else None}
        (tmp / "selected.json").write_text(json.dumps(selected) + "\n")
    _replace_folder(folder, write)


def save_checkpoint(model: nn.Module, tokenizer, optimizer, scaler, cfg: RunConfig, state: TrainState,
                    folder: Path) -> None:
    """The model folder plus state.pt: optimiser, scaler and the TrainState (step, cursor, best, RNG)."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_io.save(cfg, tmp / "crossrank.yaml")
        torch.save({"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                    "state": dataclasses.asdict(state)}, tmp / "state.pt")
    _replace_folder(folder, write)


def _replace_folder(folder: Path, write) -> None:
    """Write into `.name.tmp`, fsync, then rename: `folder` is always either the old or the new complete one
    (a crash between the two renames leaves `.name.old`, which `_recover_folder` puts back)."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for file in tmp.iterdir():
            os.chmod(file, FILE_MODE)  # safetensors writes owner-only files; checkpoints are shared like all outputs
            with open(file, "rb") as f:
                os.fsync(f.fileno())
    except BaseException as e:  # e.g. a full disk: the old folder stays as it was, and no half-written copy
        shutil.rmtree(tmp, ignore_errors=True)
        # a full disk surfaces as OSError, safetensors' SafetensorError or torch.save's RuntimeError
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError" or "write" in str(e).lower():
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[0]
            raise CrossrankError(f"{folder}: could not be written ({reason}); the previous {folder.name} (if "
                                 f"any) is intact") from None
        raise
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def _recover_folder(folder: Path) -> bool:
    """Whether `folder` exists, after undoing an interrupted `_replace_folder`."""
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.exists():
        os.replace(old, folder)
    return (folder / "state.pt").is_file()


def _check_checkpoint(folder: Path) -> None:
    """A checkpoint folder that a crash or a full disk left incomplete or corrupt: say which file, and what to do
    (the folder is only ever replaced whole, so this means it was damaged after it was written)."""
    restart = f"delete {folder} to start the run again from step 0"
    for name in ("crossrank.yaml", "config.json", "model.safetensors", "state.pt"):
        if not (folder / name).is_file() or not (folder / name).stat().st_size:
            raise CrossrankError(f"{folder / name}: missing or empty in the checkpoint (expected a complete "
                                 f"checkpoint folder; {restart})")
    try:
        check_model_folder(folder)
    except CrossrankError as e:
        raise CrossrankError(f"{e}; {restart}") from None


def _load_state(path: Path, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated or not a torch file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrossrankError(f"{path}: corrupt or truncated training state ({reason}); delete {path.parent} to "
                             f"start the run again from step 0") from None


def _check_same_recipe(cfg: RunConfig, saved_path: Path) -> None:
    """Resuming with another recipe would silently mix two runs: refuse, naming the keys that differ."""
    import yaml

    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8"))
    now = config_io.to_dict(cfg)
    # may change on resume: batch_tokens/score_grad say how a micro-batch is chunked, not what it computes; a run
    # folder may be moved (e.g. off scratch) and resumed there
    free = {"max_steps", "epochs", "eval_every", "save_every", "log_every", "report_to", "batch_tokens", "score_grad",
            "output_dir", "models_dir"}
    defaults = config_io.to_dict(RunConfig())  # a key newer than the checkpoint counts as its default
    differ = [f"{section}.{key}" for section in ("model", "data", "optim", "train")
              for key, value in now[section].items()
              if key not in free and saved.get(section, {}).get(key, defaults[section][key]) != value]
    if differ:
        raise CrossrankError(f"{saved_path}: the checkpoint was trained with other settings ({', '.join(differ)}); "
                             f"resume with the same ones, or set train.output_dir to start a new run")


# ---------------------------------------------------------------------------------------------------------
# RNG states, signals, metrics


def _gather_rng(ddp: Distributed) -> list:
    mine = {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(ddp.device) if ddp.device.type == "cuda" else None}
    if ddp.world == 1:
        return [mine]
    states = [None] * ddp.world
    dist.all_gather_object(states, mine)
    return states


def _set_rng(states: list, ddp: Distributed) -> None:
    if len(states) != ddp.world:
        raise CrossrankError(f"checkpoint: saved by {len(states)} process(es), resumed with {ddp.world} "
                             f"(expected the same number of GPUs for an exact resume)")
    mine = states[ddp.rank]
    version, internal, gauss = mine["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(mine["torch"].cpu())
    if mine["cuda"] is not None and ddp.device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"].cpu(), ddp.device)


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


def _duration(seconds: float) -> str:
    """3725 -> '1:02:05' (the ETA in the bar)."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint (they will be logged again). A torn last line (killed
    while appending) is such a row; a broken line before it is a damaged file."""
    if path.is_file():
        lines = path.read_text(encoding="utf-8").splitlines()
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                row_step = json.loads(line)["step"]
            except (ValueError, KeyError, TypeError):
                if number == len(lines):
                    break
                raise CrossrankError(f"{path}:{number}: not a metrics row (expected JSON with a step, got "
                                     f"{line[:60]!r}); fix or delete the line to resume") from None
            if row_step <= step:
                rows.append(line)
        with atomic_write(path) as f:
            f.writelines(row + "\n" for row in rows)


def _log(folder: Path, row: dict, reporters: list) -> None:
    with open(folder / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    for reporter in reporters:
        reporter.log(row)


class _TensorBoard:
    def __init__(self, folder: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def log(self, row: dict) -> None:
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(key, value, row["step"])

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, cfg: RunConfig, folder: Path):
        import wandb
        self.run = wandb.init(project="crossrank", name=folder.name, id=folder.name, resume="allow",
                              dir=str(folder), config=config_io.to_dict(cfg))

    def log(self, row: dict) -> None:
        self.run.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        self.run.finish()


def _open_reporters(cfg: RunConfig, folder: Path) -> list:
    reporters = []
    for name in cfg.train.report_to:
        try:
            reporters.append(_TensorBoard(folder) if name == "tensorboard" else _WandB(cfg, folder))
        except ImportError:
            raise CrossrankError(f"config: train.report_to has {name}, which is not installed "
                                 f"(pip install {name}, or drop it from train.report_to)") from None
    return reporters


def _plot(folder: Path, metric: str) -> None:
    """curve.png: training loss and validation metric against the step."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()] \
        if (folder / "metrics.jsonl").is_file() else []
    train_rows = [r for r in rows if "loss" in r]
    valid_rows = [r for r in rows if f"valid_{metric}" in r]
    figure, left = plt.subplots(figsize=(7, 4))
    left.plot([r["step"] for r in train_rows], [r["loss"] for r in train_rows], color="tab:blue")
    left.set_xlabel("optimiser step")
    left.set_ylabel("training loss", color="tab:blue")
    if valid_rows:
        right = left.twinx()
        right.plot([r["step"] for r in valid_rows], [r[f"valid_{metric}"] for r in valid_rows], "o-",
                   color="tab:orange")
        right.set_ylabel(f"validation {metric}", color="tab:orange")
    figure.tight_layout()
    with contextlib.suppress(OSError):
        figure.savefig(folder / ".curve.tmp.png")
        os.replace(folder / ".curve.tmp.png", folder / "curve.png")
    plt.close(figure)
