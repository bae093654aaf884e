"""Re-ranking a first-stage run with a cross-encoder: fast, shardable, resumable.

The unit of work is a *block* of `eval.block_queries` consecutive queries (in qid order). A block's pairs
are tokenised up front (on CUDA in a background thread, while the GPU scores the previous block), sorted by length
and cut into batches that hold about `eval.batch_tokens` padded tokens, so short pairs go in large batches and
little compute is spent on padding. Because a block's batches depend only on the block itself:
- sharding: rank r of a torchrun world of size W scores blocks r, r + W, ...; rank 0 merges the blocks into
  one run, bit-identical to a single-process run (same batches, same arithmetic);
- resume: every finished block is written atomically to `.<run>.parts-<key>/<block>.tsv`, its last line a
  trailer (`#end`, line count, sha256); a restarted job skips finished blocks whose trailer checks out (a
  damaged one is scored again, with a warning), i.e. restarts at the first unfinished query's block. `<key>` hashes the model and the
  candidates, so parts of another model or run are never mixed in. The parts are removed after the merge.
- score cache (optional, `eval.score_cache`): SQLite keyed by (model fingerprint, query text, docno), shared
  across runs (BM25 and ColBERTv2 top-100s share many passages) and ranks.

Scores in the written run are rounded to 6 decimals before sorting, so the file's order is exactly what
trec_eval reads back (ties: score desc, docno desc, see `crossrank.data.runs.sort_ranking`).

Listwise models (`model.listwise`: the Set-Encoder, `crossrank.models.set_encoder`) need all passages of a query in one
forward pass: their blocks are batched one whole query list at a time (`prepare_block`), per-field truncation.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from crossrank.config import EvalConfig
from crossrank.models.encoding import INTERACTION_TOKEN, PairTokenizer, encode_lists, plan_batches
from crossrank.distributed import Distributed
from crossrank.errors import CrossrankError
from crossrank.data.runs import Run, qid_order, sort_ranking, write_run
from crossrank.data.atomic import atomic_write
from crossrank.models.precision import autocast_dtype, cpu_flags, resolve_precision
from crossrank.inference.cache import ScoreCache, text_digest
from crossrank.inference.candidates import Candidates


SCORE_DECIMALS = 6  # scores are rounded so that runs from different batchings and shards are identical
ScoredPair = tuple[str, str, float]  # (qid, docno, score)


# ---------------------------------------------------------------------------------------------------------
# Batching and scoring


def prepare_block(pairs: list[tuple[str, str]], candidates: Candidates, tokenizer: PairTokenizer,
                  batch_tokens: int, listwise: bool = False) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Tokenise a block's (qid, docno) pairs and pad them into batches: [(pair indices, tensors [1, N, L])],
    every row a pair; `listwise`: one batch per query, tensors [1, D, L] and its list mask [1, D]."""
    index = {q: i for i, q in enumerate(dict.fromkeys(q for q, _ in pairs))}
    groups = [index[q] for q, _ in pairs]
    if listwise:
        interaction_id = tokenizer.fields.token_to_id(INTERACTION_TOKEN)
        return [(rows, encode_lists(tokenizer, interaction_id, [candidates.queries[pairs[rows[0]][0]]],
                                    [[candidates.texts[pairs[i][1]] for i in rows]]))
                for rows in plan_batches([], groups, batch_tokens, listwise)]
    encoded = tokenizer.encode([candidates.queries[q] for q, _ in pairs], [candidates.texts[d] for _, d in pairs])
    batches = plan_batches([len(ids) for ids, _ in encoded], groups, batch_tokens)
    return [(batch, tokenizer.pad_list([encoded[i] for i in batch])) for batch in batches]


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with every Linear layer dynamically quantised to int8 (weights per output channel,
    activations per batch), for CPU re-ranking at eval.precision=int8. The model itself is left as it is."""
    import copy
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: quantise the module it wraps
    with warnings.catch_warnings():  # torch 2.13 marks torch.ao.quantization deprecated (moving to torchao)
        warnings.simplefilter("ignore")
        # one scale per output row: per-tensor scales lose the small rows next to the large ones
        return quantize_dynamic(copy.deepcopy(model), {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


_INT8_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (weights' versions, int8 copy)


def int8_model(model: nn.Module) -> nn.Module:
    """`quantize_int8(model)`, built once per model and state of its weights (quantising MiniLM takes ~1-2 s).
    Every in-place change of a parameter (an optimiser step, load_state_dict) bumps its version counter, so
    validation during training never scores with stale weights."""
    versions = tuple(p._version for p in model.parameters())
    cached = _INT8_COPIES.get(model)
    if cached is None or cached[0] != versions:
        cached = _INT8_COPIES[model] = (versions, quantize_int8(model))
    return cached[1]


@torch.inference_mode()
def score_batches(model: nn.Module, batches: list[tuple[list[int], dict[str, torch.Tensor]]], n: int,
                  device: torch.device, progress: tqdm | None = None,
                  dtype: torch.dtype | None = None) -> list[float]:
    """Scores of the `n` pairs of a block, in pair order, under autocast to `dtype` (None: fp32)."""
    scores = [0.0] * n
    for indices, batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = model(**batch)  # [Q, D]
        values = (out[batch["mask"]] if "mask" in batch else out.reshape(-1)).float().cpu().tolist()  # [N]
        for i, value in zip(indices, values):
            scores[i] = value
        if progress is not None:
            progress.update(len(indices))
    return scores


# ---------------------------------------------------------------------------------------------------------
# The re-ranking loop


def blocks_of(candidates: Candidates, block_queries: int) -> list[list[str]]:
    qids = sorted(candidates.run, key=qid_order)  # the order write_run writes queries in
    return [qids[i: i + block_queries] for i in range(0, len(qids), block_queries)]


def parts_folder(out: Path, fingerprint: str, candidates: Candidates, eval_cfg: EvalConfig) -> Path:
    """Where finished blocks go; the name changes with the model, the candidates (and their texts), the block
    layout and the precision (`rerank` passes it resolved, so auto on two machines with other CPUs differs)."""
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(json.dumps([eval_cfg.block_queries, eval_cfg.batch_tokens, eval_cfg.precision,
                              candidates.queries, {q: [d for d, _ in r] for q, r in candidates.run.items()}],
                             sort_keys=True).encode())
    for docno in sorted({d for r in candidates.run.values() for d, _ in r}):
        digest.update(text_digest(candidates.texts[docno]).encode())
    return out.parent / f".{out.name}.parts-{digest.hexdigest()[:12]}"


def score_blocks(model: nn.Module, tokenizer: PairTokenizer, candidates: Candidates, blocks: list[list[str]],
                 todo: list[int], eval_cfg: EvalConfig, device: torch.device, cache: ScoreCache | None = None,
                 progress: tqdm | None = None) -> Iterator[tuple[int, list[ScoredPair]]]:
    """Yield (block index, [(qid, docno, score)]) for the blocks in `todo`, in order (`eval_cfg.precision`
    resolved by `with_precision`). On CUDA the next block's
    cache look-up and tokenisation run in a background thread while the model scores the current one (the fast
    tokenizer and torch both release the GIL)."""
    def pairs_of(b: int) -> list[tuple[str, str]]:  # built per block: a top-1000 run has millions of pairs
        return [(q, d) for q in blocks[b] for d, _ in candidates.run[q]]

    def key(q: str, d: str) -> tuple[str, str]:  # what a mono score depends on: the two texts
        return candidates.queries[q], (text_digest(candidates.texts[d]) if cache else d)

    def prepare(b: int) -> tuple[list, dict, list, list]:
        pairs = pairs_of(b)
        keys = [key(q, d) for q, d in pairs]
        cached = cache.get(keys) if cache else {}
        uncached = [p for p, k in zip(pairs, keys) if k not in cached]
        return pairs, cached, uncached, prepare_block(uncached, candidates, tokenizer, eval_cfg.batch_tokens,
                                                      model.listwise)

    precision = eval_cfg.precision  # resolved by the caller (`with_precision`)
    if precision == "int8":
        model = int8_model(model)
    # On CUDA the next block is prepared in a thread while the GPU works; on CPU the model already uses every
    # core, and a competing thread slows it down (measured), so the work is done inline there.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        overlap = device.type == "cuda"
        future = pool.submit(prepare, todo[0]) if todo and overlap else None
        for position, b in enumerate(todo):
            pairs, cached, uncached, batches = future.result() if overlap else prepare(b)
            if overlap and position + 1 < len(todo):
                future = pool.submit(prepare, todo[position + 1])
            if progress is not None:
                progress.update(len(pairs) - len(uncached))
            scores = score_batches(model, batches, len(uncached), device, progress, autocast_dtype(precision))
            new = {key(q, d): s for (q, d), s in zip(uncached, scores)}
            if cache:
                cache.put(new)
            merged = {**cached, **new}
            yield b, [(q, d, merged[key(q, d)]) for q, d in pairs]


def with_precision(eval_cfg: EvalConfig, device: torch.device, listwise: bool = False) -> EvalConfig:
    """`eval_cfg` with `eval.precision` made concrete for `device` and this CPU (never auto), where re-ranking
    starts (`rerank`, `score_candidates`, infer.py's report of it): the value keys the resume parts and the
    score cache, and the scoring below takes it as it is."""
    return dataclasses.replace(eval_cfg, precision=resolve_precision(eval_cfg.precision, device.type, cpu_flags(),
                                                                     listwise))


def score_candidates(model: nn.Module, tokenizer: PairTokenizer, candidates: Candidates,
                     eval_cfg: EvalConfig) -> Run:
    """Re-rank in memory (no files): the same blocks and batches as `rerank`, so the same scores."""
    blocks = blocks_of(candidates, eval_cfg.block_queries)
    device = next(model.parameters()).device
    eval_cfg = with_precision(eval_cfg, device, model.listwise)
    run: Run = {}
    for _, scored in score_blocks(model, tokenizer, candidates, blocks, list(range(len(blocks))), eval_cfg,
                                  device):
        for q, d, s in scored:
            run.setdefault(q, []).append((d, round(s, SCORE_DECIMALS)))
    return {q: sort_ranking(r) for q, r in run.items()}


def rerank(model: nn.Module, tokenizer: PairTokenizer, candidates: Candidates, out: str | os.PathLike,
           eval_cfg: EvalConfig, fingerprint: str, dist: Distributed | None = None,
           tag: str = "crossrank") -> Run | None:
    """Re-rank `candidates` into the run file `out` (atomically). With several ranks each scores its blocks and
    rank 0 merges; returns the run on rank 0 and None elsewhere. Interrupted runs resume from the parts."""
    dist = dist or Distributed(device=next(model.parameters()).device)
    # from here on the precision is concrete (never auto): it keys the parts (resume) and the score cache
    eval_cfg = with_precision(eval_cfg, dist.device, model.listwise)
    out = Path(out)
    parts = parts_folder(out, fingerprint, candidates, eval_cfg)  # made by the first finished block's write
    blocks = blocks_of(candidates, eval_cfg.block_queries)
    mine = list(range(dist.rank, len(blocks), dist.world))
    todo = [b for b in mine if not part_is_complete(parts / f"{b:06d}.tsv", blocks[b], candidates)]
    if len(todo) < len(mine):
        print(f"rank {dist.rank}: resuming, {len(mine) - len(todo)} of {len(mine)} blocks already in {parts}",
              file=sys.stderr)
    if eval_cfg.score_cache and model.listwise:
        raise CrossrankError("eval.score_cache cannot be used with model.kind set-encoder (a passage's score "
                             "depends on the whole list; expected eval.score_cache empty)")
    # scores depend on the (resolved) precision too: it is part of the cache key
    cache = ScoreCache(eval_cfg.score_cache, f"{fingerprint}/{eval_cfg.precision}") if eval_cfg.score_cache else None
    total = sum(len(candidates.run[q]) for b in todo for q in blocks[b])
    with tqdm(total=total, unit="pair", desc=f"re-rank {out.name}", disable=not dist.is_main, file=sys.stderr,
              dynamic_ncols=True) as progress:
        for b, scored in score_blocks(model, tokenizer, candidates, blocks, todo, eval_cfg, dist.device, cache,
                                      progress):
            with atomic_write(parts / f"{b:06d}.tsv") as f:  # a finished block, all or nothing
                write_part(f, scored)
    if dist.world > 1:
        torch.distributed.barrier()
    if not dist.is_main:
        return None
    run = merge_parts(parts, len(blocks))
    write_run(out, run, tag=tag)
    shutil.rmtree(parts)  # also removes temporary files a killed process left behind
    return run


def merge_parts(parts: Path, num_blocks: int) -> Run:
    """The run from all finished blocks; scores rounded as written, so sorting sees what trec_eval will."""
    run: Run = {}
    for b in range(num_blocks):
        file = parts / f"{b:06d}.tsv"
        if not file.is_file():
            raise CrossrankError(f"{file}: block {b} was not scored (expected every rank to finish; rerun to resume)")
        lines = read_part(file)
        if lines is None:
            raise CrossrankError(f"{file}: block {b} is incomplete or damaged (expected its trailer line; rerun "
                                 f"to score it again)")
        for qid, docno, score in lines:
            run.setdefault(qid, []).append((docno, round(float(score), SCORE_DECIMALS)))
    return {q: sort_ranking(r) for q, r in run.items()}


PART_TRAILER = "#end"  # a part's last line: `#end<TAB>lines<TAB>sha256 of the lines before it`


def write_part(f, scored: list[ScoredPair]) -> None:
    """A block's scores, then the trailer that proves the file complete (written last)."""
    body = "".join(f"{q}\t{d}\t{s!r}\n" for q, d, s in scored)
    f.write(body)
    f.write(f"{PART_TRAILER}\t{len(scored)}\t{hashlib.sha256(body.encode()).hexdigest()}\n")


def read_part(file: Path) -> list[tuple[str, str, str]] | None:
    """A part's (qid, docno, score) lines, or None if it is not complete and intact (no trailer, a count or
    checksum that does not match, a malformed line): such a part is scored again, never trusted."""
    try:
        data = file.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    body, _, trailer = data.rstrip("\n").rpartition("\n")
    fields = trailer.split("\t")
    if len(fields) != 3 or fields[0] != PART_TRAILER or not data.endswith("\n"):
        return None
    body += "\n" if body else ""
    if hashlib.sha256(body.encode()).hexdigest() != fields[2]:
        return None
    rows = [tuple(line.split("\t")) for line in body.splitlines()]
    if str(len(rows)) != fields[1] or any(len(r) != 3 for r in rows):
        return None
    return rows  # type: ignore[return-value]


def part_is_complete(file: Path, qids: list[str], candidates: Candidates) -> bool:
    """Whether block `file` may be reused: intact (`read_part`) and holding exactly the block's pairs. A damaged
    one is reported in one line and scored again."""
    if not file.is_file():
        return False
    rows = read_part(file)
    expected = sorted((q, d) for q in qids for d, _ in candidates.run[q])
    if rows is not None and sorted((q, d) for q, d, _ in rows) == expected:
        try:
            [float(score) for _, _, score in rows]
            return True
        except ValueError:
            pass
    print(f"warning: {file}: incomplete or damaged block (trailer, count or checksum does not match); scoring "
          f"it again", file=sys.stderr)
    return False
