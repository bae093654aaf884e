"""Scoring a micro-batch for the backward pass within `train.batch_tokens`: whole queries packed into parts
(straight backward) or, for a query too big alone, cached score gradients (GradCache); the Set-Encoder's
whole-list loss."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from crossrank.config import RunConfig
from crossrank.training.data import Batch
from crossrank.models.encoding import PairTokenizer
from crossrank.models.encoding import plan_batches
from crossrank.novelty import duplicate_bce, novelty_targets
from crossrank.models.set_encoder import ListScores


# A straight part's chunks hold at most train.batch_tokens / this padded tokens each: small enough that a short
# pair is rarely padded to a long one, large enough for efficient GEMMs. Measured (bench/training.py, KD 16 x 20,
# DL19 text, 2 CPUs, batch_tokens 4096): / 2 11.3, / 4 12.4-12.6, / 8 12.8-13.9, / 16 11.5 pairs/s.
STRAIGHT_CHUNK_SHARE = 8


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
    queries with a score-independent normaliser (`crossrank.training.losses`), so its gradient is the part's exact share.
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
