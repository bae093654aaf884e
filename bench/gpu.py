#!/usr/bin/env python
"""GPU check: the CUDA paths of crossrank (bf16 autocast, SDPA, torch.compile, NCCL, the first-token shortcut,
background tokenisation) run and measured against the peers, in one command that prints one table.

Sections (`--sections`, default all; 5 comes with 1 and 2), every figure from the project's public code paths:
  1 rerank      `crossrank.models.loading.load_model` + `score_candidates` (eager, and `eval.compile=true` for
                ELECTRA-base) against sentence-transformers' `CrossEncoder.predict` with the model cast to bf16
                (batch size 32, its default, and 128; the faster is the peer), same pairs, same max length
                (256, pair truncation). pairs/s (best of `rounds`, contenders alternated), peak extra GPU memory,
                per-query Kendall tau of bf16 vs fp32 scores. Models: ELECTRA-base and RoBERTa-base shapes with
                random weights (built from configs, no download) and the real packaged MiniLM; the tau gate
                (>= --min-tau) is on MiniLM only, with its 1-logit head fitted first (`fit_head`: ridge
                regression of the head's fp32 input features onto each query's standardised first-stage
                scores, on the workload itself): the packaged backbone has no head, and a random one gives
                near-constant scores that reorder under any rounding, so the gate failed on a CPU with native
                bf16 for the head's sake, not bf16's. The random networks' taus are printed as info
                (0.93-0.98 measured for random ELECTRA-base on CPU).
  2 train       `crossrank.training.loop.train(cfg)` (configs + overrides, so it follows the loop however it scores
                micro-batches) on ELECTRA-base: the CL recipe's micro-batch (4 queries x 100) and KD's (16 x 20),
                bf16, `warmup` steps then `steps` timed (from metrics.jsonl), against sentence-transformers'
                `CrossEncoderTrainer` on the same examples (CL: MultipleNegativesRankingLoss with the 99 hard
                negatives and its minimum of 1 in-batch negative, so it scores 101 pairs per query; KD:
                RankNetLoss on the 20 teacher targets), bf16 autocast on both sides. pairs/s, peak GPU memory.
  3 set-encoder one training step (`train(cfg)`, configs/set-encoder/KD.yaml: gradient checkpointing, a
                100-passage list) and re-ranking 50 queries x 100 passages (`score_candidates` on the
                Set-Encoder), ELECTRA-base shape: time and peak GPU memory.
  4 torchrun    `torchrun --standalone --nproc_per_node 1 train.py ...` on a tiny generated collection: two steps
                and a checkpoint, then the same command resumes (step 3); plus a DDP + all_reduce probe in a
                one-process NCCL group, because crossrank's `setup_distributed` joins no process group for a
                world of 1 (so train.py alone never touches NCCL on one GPU).
  5 gemm        bf16 torch.mm rate at the model's shapes (tokens x hidden x {hidden, intermediate} and back) and
                each throughput above as a fraction of the ideal it implies (FLOPs of the full model on the
                unpadded tokens over that rate; training counts forward + backward as 3x the forward).
Targets printed: ELECTRA-base bf16 re-ranking >= 3000 pairs/s and >= 1.3x the peer; training >= 1.3x the peer.
Exit status 1 if any row FAILs (an error, a failed check or a missed target), else 0.

Workload: TREC DL 2019 BM25 top-100 passages when `--data` (default ../shared/data/trec-dl/dl19) exists, else
synthetic MS MARCO-like text (queries 3-12 words, passages 20-110 words); queries are repeated to reach 50.

    python bench/gpu.py                 # on the GPU machine (< 8 min on one H100/H200); bench/gpu.sh wraps it
    python bench/gpu.py --dry-run       # tiny shapes on CPU, gloo instead of NCCL, same code paths; ~45 s on
                                        # 2 cores (torch.compile only with --compile: ~1 min more there)
    python bench/gpu.py --pack .gpu     # here: a half-precision copy of the packaged MiniLM and the wheels the
                                        # GPU image lacks, to carry there (the MiniLM wheel itself is 84 MB)
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers import AutoConfig  # noqa: E402

MINILM = "packaged:all-MiniLM-L6-v2"
PACKED_MINILM = ROOT / ".gpu" / "minilm"  # what --pack writes, used when present
DL19 = next((p / "shared" / "data" / "trec-dl" / "dl19" for p in (ROOT.parent, ROOT.parent.parent)
             if (p / "shared" / "data" / "trec-dl" / "dl19").is_dir()), ROOT.parent / "shared" / "data" / "trec-dl" / "dl19")
MAX_LENGTH = 256
TARGET_PAIRS_PER_S, TARGET_RATIO, MIN_TAU = 3000.0, 1.3, 0.98
OVERRUN_S = 90  # a step still running this long past --budget is stopped
WHEELS = ["datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19"]  # requirements.txt's, absent on the GPU image


@dataclasses.dataclass
class Plan:
    """Workload sizes: the issue's on the GPU, tiny ones for --dry-run."""
    queries: int = 50  # re-ranking (and Set-Encoder re-ranking) queries
    depth: int = 100  # passages per query
    rounds: int = 3  # timed re-ranking passes per contender (best is kept)
    cl_queries: int = 4
    cl_passages: int = 100  # 1 relevant + 99 negatives
    kd_queries: int = 16
    kd_passages: int = 20
    warmup: int = 3  # training steps not timed
    steps: int = 20  # timed training steps
    gemm_tokens: int = 16384  # rows of the GEMMs (eval.batch_tokens' default)
    batch_tokens: int = 16384
    peer_batch_sizes: tuple[int, ...] = (32, 128)
    warm_up: bool = True  # an untimed pass of every re-ranking contender first


DRY = Plan(queries=3, depth=8, rounds=1, cl_queries=2, cl_passages=8, kd_queries=2, kd_passages=5, warmup=1,
           steps=1, gemm_tokens=256, batch_tokens=2048, peer_batch_sizes=(32,), warm_up=False)


# ---------------------------------------------------------------------------------------------------------
# The table


@dataclasses.dataclass
class Row:
    section: str
    check: str
    value: str
    target: str = ""
    status: str = "info"  # PASS | FAIL | info | dry (a target not gated in a dry run)


class Report:
    def __init__(self, dry: bool):
        self.rows: list[Row] = []
        self.dry = dry

    def add(self, section: str, check: str, value: str, target: str = "", ok: bool | None = None,
            speed_target: bool = False) -> None:
        """A row; `ok` None = information only. A speed target is not gated in a dry run (status `dry`)."""
        status = "info" if ok is None else ("dry" if self.dry and speed_target else ("PASS" if ok else "FAIL"))
        self.rows.append(Row(section, check, value, target, status))
        print(f"[{section}] {check}: {value} {target} {status}", flush=True)

    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.status == "FAIL"]

    def print_table(self) -> None:
        lines = [dataclasses.astuple(r) for r in [Row("section", "check", "value", "target", "status"), *self.rows]]
        widths = [max(len(line[i]) for line in lines) for i in range(5)]
        print()
        for line in lines:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())


# ---------------------------------------------------------------------------------------------------------
# Device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak GPU memory allocated inside the block, above what was allocated when it began (GiB; None on CPU)."""

    def __init__(self, device: torch.device):
        self.device, self.gib = device, None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            self.gib = (torch.cuda.max_memory_allocated(self.device) - self.before) / 2**30


def gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value:.2f} GiB"


# ---------------------------------------------------------------------------------------------------------
# Models and workload (no downloads: base shapes from configs, random weights, the packaged tokenizer)


def minilm_path(given: str) -> str:
    from crossrank.models.mono import resolve_model_path

    if given:
        return given
    return str(PACKED_MINILM) if PACKED_MINILM.is_dir() else resolve_model_path(MINILM)


def build_models(folder: Path, minilm: str, dry: bool) -> dict[str, str]:
    """{name: checkpoint folder}: ELECTRA-base and RoBERTa-base shapes with random weights and a 1-logit head,
    and the real MiniLM (a bare backbone: its head is random, seeded by load_model). The tokenizer is MiniLM's
    (uncased WordPiece, ELECTRA's vocabulary); the RoBERTa shape gets it without token type ids."""
    from transformers import (AutoTokenizer, ElectraConfig, ElectraForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    tokenizer = AutoTokenizer.from_pretrained(minilm)
    size = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if dry else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    suffix = "tiny" if dry else "base"
    torch.manual_seed(0)
    electra = ElectraForSequenceClassification(ElectraConfig(
        vocab_size=tokenizer.vocab_size, embedding_size=size["hidden_size"], num_labels=1, **size))
    roberta = RobertaForSequenceClassification(RobertaConfig(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=514, type_vocab_size=1,  # roberta-base
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id, num_labels=1, **size))
    models = {f"electra-{suffix}": (electra, tokenizer),
              f"roberta-{suffix}": (roberta, AutoTokenizer.from_pretrained(
                  minilm, model_input_names=["input_ids", "attention_mask"]))}
    paths = {}
    for name, (model, tok) in models.items():
        model.save_pretrained(folder / name)
        tok.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    paths["minilm"] = float32_copy(minilm, folder / "minilm")
    return paths


def float32_copy(path: str, folder: Path) -> str:
    """`path` itself, or, when its weights are stored in half precision (a --pack copy), a float32 copy in
    `folder`: transformers loads weights in the dtype they are stored in, and the fp32 reference needs fp32."""
    import shutil

    from safetensors.torch import load_file, save_file

    weights = load_file(str(Path(path) / "model.safetensors"))
    if all(v.dtype != torch.float16 for v in weights.values()):
        return path
    shutil.copytree(path, folder)
    save_file({k: v.float() if v.is_floating_point() else v for k, v in weights.items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def workload(data: Path, n_queries: int, depth: int, seed: int = 0):
    """(Candidates, description): DL19 BM25 top-`depth` when present (queries repeated under new qids to reach
    `n_queries`), else synthetic MS MARCO-like text."""
    from crossrank.inference.candidates import Candidates
    from crossrank.data.texts import load_corpus, read_topics
    from crossrank.data.runs import load_run, qid_order

    if (data / "runs" / "bm25.top100.run").is_file():
        run = load_run(data / "runs" / "bm25.top100.run", depth=depth)
        qids = [q for q in sorted(run, key=qid_order) if len(run[q]) >= depth]
        topics = read_topics(data / "queries.jsonl")
        picked = [qids[i % len(qids)] for i in range(n_queries)]
        texts = load_corpus(data / "corpus.jsonl", {d for q in set(picked) for d, _ in run[q]})
        new = {f"{q}.{i}": q for i, q in enumerate(picked)}
        return (Candidates({n: run[q] for n, q in new.items()}, {n: topics[q] for n, q in new.items()}, texts),
                f"TREC DL 2019 BM25 top-{depth} ({len(set(picked))} distinct queries)")
    from crossrank.demo import ASPECTS, FILLER, THEMES

    rng = random.Random(seed)
    vocab = sorted({w for words in THEMES.values() for w in words.split()} | set(ASPECTS)
                   | {w for s in FILLER for w in s.split()})
    queries = {f"q{i}": " ".join(rng.choices(vocab, k=rng.randint(3, 12))) for i in range(n_queries)}
    run, texts = {}, {}
    for q in queries:
        run[q] = [(f"{q}d{j}", float(depth - j)) for j in range(depth)]
        texts.update({d: " ".join(rng.choices(vocab, k=rng.randint(20, 110))) for d, _ in run[q]})
    return Candidates(run, queries, texts), "synthetic MS MARCO-like text"


def write_training_data(root: Path, candidates) -> dict[str, Path]:
    """The workload as preprocessed CL and KD folders (crossrank.training.examples' layout, no validation split):
    CL marks one random candidate of each query relevant; KD reads the candidate order as a teacher ranking."""
    from crossrank.training.examples import TrainingQuery, write_meta, write_split

    root.mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"docno": d, "text": t}) + "\n" for d, t in candidates.texts.items())
    with open(root / "topics.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"_id": q, "text": t}) + "\n" for q, t in candidates.queries.items())
    rng, folders = random.Random(0), {}
    for objective in ("CL", "KD"):
        queries = []
        for qid, ranking in candidates.run.items():
            docnos, scores = [d for d, _ in ranking], [s for _, s in ranking]
            judged = {rng.choice(docnos): 1} if objective == "CL" else {}
            queries.append(TrainingQuery(qid, docnos, scores, judged))
        folder = folders[objective] = root / objective
        folder.mkdir(exist_ok=True)
        write_split(folder, "train", queries)
        write_split(folder, "valid", [])
        write_meta(folder, {"dataset": "gpu-bench", "objective": objective, "topics": str(root / "topics.jsonl"),
                            "corpus": str(root / "corpus.jsonl"), "qrels": "", "evalperc": 0, "seed": 42})
    return folders


def fit_head(folder: str, candidates, out: Path, device: torch.device) -> tuple[str, str]:
    """The model of `folder` with its 1-logit head fitted in closed form and saved in `out`, and a line saying
    how well it fits. The head is the last Linear layer with one output (BERT's `classifier`, ELECTRA's
    `classifier.out_proj`); its input features are taken in fp32 on `device` for every pair of the workload,
    and ridge regression maps them onto each query's standardised first-stage scores (z-scores). A trained
    head separates a query's passages along the directions in which the features vary most, which is what
    makes a tau of bf16 against fp32 measure bf16's rounding; a random head's near-constant scores swap under
    any rounding. The ridge is the features' mean variance: the head follows their main directions, as one
    trained for a few steps from zero does. A near-interpolating fit (a ridge 1000x smaller) puts weight on
    directions of tiny variance and magnifies rounding noise instead (measured on CPU, DL19 BM25 16 queries x
    50: tau bf16 vs fp32 0.974 there, 0.994 with this ridge, 0.988 with a random head). Fitting on the scored
    pairs themselves is fine here: the gate compares two precisions of one model, not its effectiveness."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1][-1]
    keys = [(q, d) for q, r in candidates.run.items() for d, _ in r]
    targets = []
    for ranking in candidates.run.values():
        scores = torch.tensor([s for _, s in ranking], dtype=torch.float64)
        spread = scores.std() if len(scores) > 1 else torch.tensor(0.0)
        targets.append((scores - scores.mean()) / spread if spread > 0 else torch.zeros_like(scores))
    y = torch.cat(targets)
    features = []
    hook = head.register_forward_hook(lambda module, inputs, output: features.append(inputs[0].double().cpu()))
    with torch.no_grad():
        for start in range(0, len(keys), 256):
            rows = keys[start:start + 256]
            batch = tokenizer([candidates.queries[q] for q, _ in rows], [candidates.texts[d] for _, d in rows],
                              padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt").to(device)
            model(**batch)
    hook.remove()
    x = torch.cat(features)  # [pairs, hidden]
    mean_x, mean_y = x.mean(0), y.mean()
    xc, yc = x - mean_x, y - mean_y
    gram = xc.T @ xc
    ridge = gram.trace() / gram.shape[0] + 1e-9  # the features' mean variance (per pair: times the pair count)
    w = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    b = mean_y - mean_x @ w
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight.dtype).view_as(head.weight))
        head.bias.copy_(b.to(head.bias.dtype).view_as(head.bias))
    fitted = xc @ w + mean_y
    r2 = 1 - ((fitted - y) ** 2).sum() / ((y - mean_y) ** 2).sum()
    within = statistics.fmean(float(fitted[i:i + len(r)].std()) for i, r in
                              zip(_offsets(candidates.run), candidates.run.values()) if len(r) > 1)
    agreement = kendall_tau_per_query(keys, fitted.tolist(), y.tolist())
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    del model
    free(device)
    return str(out), (f"R² {float(r2):.2f} on {len(keys)} pairs, score std within a query {within:.2f}, "
                      f"tau vs the first stage {agreement:.2f}")


def _offsets(run: dict) -> list[int]:
    """Where each query's pairs start in the flat list of pairs (in run order)."""
    offsets, at = [], 0
    for ranking in run.values():
        offsets.append(at)
        at += len(ranking)
    return offsets


# ---------------------------------------------------------------------------------------------------------
# 5: GEMM rate and ideals


def gemm_rate(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of torch.mm [m, k] x [k, n] on random data: median of timed repeats after a warm-up."""
    a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
    repeats = 20 if device.type == "cuda" else 5
    for _ in range(3):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - started)
    return 2 * m * k * n / statistics.median(times)


def model_rates(config, tokens: int, device: torch.device) -> dict[str, float]:
    """The encoder layer's GEMM shapes: projections (H x H) and the feed-forward (H x I, I x H)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h, i = config.hidden_size, config.intermediate_size
    return {"HxH": gemm_rate(tokens, h, h, device, dtype), "HxI": gemm_rate(tokens, h, i, device, dtype),
            "IxH": gemm_rate(tokens, i, h, device, dtype)}


def ideal_seconds_per_pair(lengths: list[int], config, rates: dict[str, float]) -> float:
    """Forward time of the full model on one pair at the measured rates: per layer Q, K, V, O (8·L·H²) at HxH,
    the feed-forward (2 x 2·L·H·I) at HxI and IxH, attention (QKᵀ and AV, 4·L²·H) at HxI's rate."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_pair = [n * (8 * L * h * h / rates["HxH"] + 2 * L * h * i / rates["HxI"] + 2 * L * h * i / rates["IxH"]
                     + 4 * L * L * h / rates["HxI"]) for L in lengths]
    return sum(per_pair) / len(per_pair)


# ---------------------------------------------------------------------------------------------------------
# 1: re-ranking


def kendall_tau_per_query(keys: list[tuple[str, str]], a: list[float], b: list[float]) -> float:
    """Mean over queries of Kendall's tau between two scorings of the same candidates."""
    from scipy.stats import kendalltau

    by_query: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(keys):
        by_query.setdefault(q, []).append(i)
    taus = [kendalltau([a[i] for i in rows], [b[i] for i in rows]).statistic for rows in by_query.values()]
    return statistics.fmean(taus)


def time_contenders(contenders: dict, rounds: int, device: torch.device, warm_up: bool
                     ) -> tuple[dict, dict, dict]:
    """Best-of-`rounds` seconds, peak extra GPU memory (first round) and last scores of each contender; the
    contenders alternate, so a change of load hits all of them alike. `warm_up`: an untimed pass each first."""
    for fn in contenders.values() if warm_up else []:
        fn()
    best, peaks, scores = dict.fromkeys(contenders, float("inf")), {}, {}
    for _ in range(rounds):
        for label, fn in contenders.items():
            with PeakMemory(device) as peak:
                started = time.perf_counter()
                scores[label] = fn()
                best[label] = min(best[label], time.perf_counter() - started)
            peaks.setdefault(label, peak.gib)
    return best, peaks, scores


def rerank_model(name: str, folder: str, candidates, plan: Plan, device: torch.device, variant: str,
                 gate_tau: bool, args, report: Report) -> None:
    """Section 1 for one model and `variant` (eager, or compiled: `eval.compile=true`, its own step, run last
    because its one-off compile takes longest), with its section-5 efficiency rows."""
    from sentence_transformers import CrossEncoder

    from crossrank.config import EvalConfig, ModelConfig
    from crossrank.inference.rerank import score_candidates
    from crossrank.models.loading import load_model

    keys = [(q, d) for q, r in candidates.run.items() for d, _ in r]
    texts = [(candidates.queries[q], candidates.texts[d]) for q, d in keys]
    model_cfg = ModelConfig(max_length=MAX_LENGTH)
    bf16 = EvalConfig(precision="bf16", batch_tokens=plan.batch_tokens)
    section, ours_label = "1 rerank", f"crossrank {'eval.compile=true' if variant == 'compiled' else 'eager'}"

    def ours(model, tokenizer, cfg=bf16):
        def run() -> list[float]:
            scores = {(q, d): s for q, r in score_candidates(model, tokenizer, candidates, cfg).items() for d, s in r}
            sync(device)
            return [scores[k] for k in keys]
        return run

    def peer_at(batch_size: int):
        def run() -> list[float]:
            out = peer.predict(texts, batch_size=batch_size, activation_fn=torch.nn.Identity(),
                               show_progress_bar=False, convert_to_numpy=True)
            sync(device)
            return out.tolist()
        return run

    model, tokenizer = load_model(folder, model_cfg, device)
    reference = ours(model, tokenizer, dataclasses.replace(bf16, precision="fp32"))()  # eager fp32 scores
    if variant == "compiled":
        del model
        model, _ = load_model(folder, model_cfg, device, compile=True)
        started = time.perf_counter()
        ours(model, tokenizer)()  # the one-off compile (dynamic shapes)
        report.add(section, f"{name} torch.compile warm-up", f"{time.perf_counter() - started:.0f} s")
    peer = CrossEncoder(folder, device=str(device), max_length=MAX_LENGTH).to(torch.bfloat16)  # the model in bf16
    contenders = {ours_label: ours(model, tokenizer),
                  **{f"CrossEncoder.predict bs{b}": peer_at(b) for b in plan.peer_batch_sizes}}
    best, peaks, scores = time_contenders(contenders, plan.rounds, device, plan.warm_up)
    rate = {label: len(keys) / seconds for label, seconds in best.items()}
    for label in contenders:
        report.add(section, f"{name} {label} bf16", f"{rate[label]:.0f} pairs/s, peak +{gib(peaks[label])}")
    peer_best = max(v for k, v in rate.items() if k.startswith("CrossEncoder"))
    tau = kendall_tau_per_query(keys, reference, scores[ours_label])
    weights = "real weights, fitted head" if gate_tau else "random weights, not gated"
    report.add(section, f"{name} {ours_label} Kendall tau bf16 vs fp32 ({weights})", f"{tau:.4f}",
               f">= {args.min_tau}" if gate_tau else "", (tau >= args.min_tau) if gate_tau else None)
    headline = name.startswith("electra")  # the targets are ELECTRA-base's
    if headline:
        report.add(section, f"{name} {ours_label} bf16 throughput", f"{rate[ours_label]:.0f} pairs/s",
                   f">= {TARGET_PAIRS_PER_S:.0f}", rate[ours_label] >= TARGET_PAIRS_PER_S, speed_target=True)
    ratio = rate[ours_label] / peer_best
    report.add(section, f"{name} {ours_label} / best CrossEncoder.predict", f"{ratio:.2f}x",
               f">= {TARGET_RATIO}" if headline else "", ratio >= TARGET_RATIO if headline else None, speed_target=True)

    efficiency_rows(name, folder, tokenizer, texts, plan, device, variant, ours_label, rate[ours_label], peer_best,
                    report)
    del model, peer, contenders
    free(device)


def efficiency_rows(name: str, folder: str, tokenizer, texts: list[tuple[str, str]], plan: Plan,
                    device: torch.device, variant: str, ours_label: str, ours: float, peer: float,
                    report: Report) -> None:
    """Section 5 for a re-ranking step: the GEMM rate at the model's shapes (once per model) and both
    throughputs as fractions of the full model's GEMM-bound ideal on these pairs."""
    config = AutoConfig.from_pretrained(folder)
    lengths = [len(ids) for ids, _ in tokenizer.encode([q for q, _ in texts], [p for _, p in texts])]
    rates = model_rates(config, plan.gemm_tokens, device)
    ideal = 1 / ideal_seconds_per_pair(lengths, config, rates)
    if variant == "eager":
        report.add("5 gemm", f"{name} GEMM rate at the model's shapes ({plan.gemm_tokens} tokens)",
                   ", ".join(f"{k} {v / 1e12:.1f}" for k, v in rates.items()) + " TFLOP/s")
    report.add("5 gemm", f"{name} re-ranking ideal (full model, {statistics.fmean(lengths):.0f} tokens/pair)",
               f"{ideal:.0f} pairs/s; {ours_label} {ours / ideal:.2f}, peer {peer / ideal:.2f} of it")


# ---------------------------------------------------------------------------------------------------------
# 2 and 3: training


def train_ours(files: list[Path], overrides: list[str], out: Path, warmup: int, device: torch.device) -> dict:
    """`train(cfg)` as train.py runs it; pairs/s of the timed steps from metrics.jsonl (one row per step, the
    same number of pairs in each, so the harmonic mean of the rows' rates)."""
    from crossrank.config import load_run_config
    from crossrank.training.loop import train

    cfg = load_run_config(files, [*overrides, "train.log_every=1", "train.eval_every=1000000",
                                  "train.save_every=1000000", f"train.output_dir={out}"])
    with PeakMemory(device) as peak:
        state = train(cfg)
    free(device)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["pairs_per_s"] for r in rows if "pairs_per_s" in r][warmup:]
    if not state.finished or not rates:
        raise RuntimeError(f"train() stopped at step {state.step} with {len(rates)} timed rows")
    return {"pairs_per_s": len(rates) / sum(1 / r for r in rates), "peak": peak.gib, "loss": rows[-1]["loss"]}


def train_peer(folder: str, objective: str, examples, stream, queries: int, steps: int, out: Path,
               device: torch.device) -> dict:
    """sentence-transformers' CrossEncoderTrainer on exactly our examples, bf16 autocast on CUDA."""
    from datasets import Dataset
    from sentence_transformers.cross_encoder import CrossEncoder, CrossEncoderTrainer, CrossEncoderTrainingArguments
    from sentence_transformers.cross_encoder.losses import MultipleNegativesRankingLoss, RankNetLoss
    from transformers import TrainerCallback

    columns = {"query": [stream.topics[e.qid] for e in examples]}
    if objective == "CL":  # the relevant passage first, then the hard negatives as columns
        for j in range(len(examples[0].docnos)):
            columns["positive" if j == 0 else f"negative_{j}"] = [stream.passages[e.docnos[j]] for e in examples]
        pairs_per_step = queries * (len(examples[0].docnos) + 1)  # + its minimum of 1 in-batch negative
    else:
        columns["docs"] = [[stream.passages[d] for d in e.docnos] for e in examples]
        columns["labels"] = [list(e.targets) for e in examples]
        pairs_per_step = queries * len(examples[0].docnos)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            times.append(time.perf_counter() - self.started)

    with PeakMemory(device) as peak:
        torch.manual_seed(42)
        model = CrossEncoder(folder, num_labels=1, max_length=MAX_LENGTH, device=str(device))
        loss = MultipleNegativesRankingLoss(model, num_negatives=1, scale=1.0, activation_fn=torch.nn.Identity()) \
            if objective == "CL" else RankNetLoss(model, activation_fn=torch.nn.Identity())
        arguments = CrossEncoderTrainingArguments(
            output_dir=str(out), per_device_train_batch_size=queries, max_steps=steps, learning_rate=1e-5,
            weight_decay=0.01, lr_scheduler_type="constant", max_grad_norm=10.0, save_strategy="no", report_to=[],
            logging_steps=steps, seed=42, use_cpu=device.type == "cpu", bf16=device.type == "cuda",
            dataloader_drop_last=True, disable_tqdm=True)
        CrossEncoderTrainer(model=model, args=arguments, train_dataset=Dataset.from_dict(columns), loss=loss,
                            callbacks=[StepTimer()]).train()
    del model, loss
    free(device)
    return {"pairs_per_step": pairs_per_step, "times": times, "peak": peak.gib}


def training_section(folder: str, data: dict[str, Path], plan: Plan, device: torch.device, tmp: Path,
                     report: Report) -> None:
    """Section 2: CL and KD micro-batches on the ELECTRA-base shape, crossrank vs the peer (+ section-5 rows)."""
    from crossrank.config import load_run_config
    from crossrank.training.data import load_training_data
    from crossrank.models.encoding import PairTokenizer
    from crossrank.models.mono import load_tokenizer

    recipes = {"CL": (plan.cl_queries, plan.cl_passages), "KD": (plan.kd_queries, plan.kd_passages)}
    config = AutoConfig.from_pretrained(folder)
    rates = model_rates(config, plan.gemm_tokens, device)
    for objective, (queries, passages) in recipes.items():
        files = [ROOT / "configs" / "backbones" / "electra.yaml", ROOT / "configs" / "objectives" / f"{objective}.yaml"]
        overrides = [f"model.path={folder}", f"data.train={data[objective]}", f"data.num_negatives={passages - 1}",
                     f"data.depth={max(passages, plan.depth) if objective == 'CL' else passages}",
                     f"train.queries_per_batch={queries}", "train.accumulation=1",
                     f"train.max_steps={plan.warmup + plan.steps}", "train.precision=bf16"]
        label = f"{objective} {queries} x {passages}"
        ours = train_ours(files, overrides, tmp / f"ours-{objective}", plan.warmup, device)
        report.add("2 train", f"{label} crossrank train() bf16", f"{ours['pairs_per_s']:.0f} pairs/s, peak "
                   f"{gib(ours['peak'])}, last loss {ours['loss']:.3f}")
        cfg = load_run_config(files, overrides)
        stream, _ = load_training_data(cfg)
        examples = [stream.example(i) for i in range((plan.warmup + plan.steps) * queries)]  # what ours trained on
        peer = train_peer(folder, objective, examples, stream, queries, plan.warmup + plan.steps,
                          tmp / f"peer-{objective}", device)
        timed = peer["times"][plan.warmup:]
        peer_rate = peer["pairs_per_step"] * len(timed) / sum(timed)
        report.add("2 train", f"{label} CrossEncoderTrainer bf16", f"{peer_rate:.0f} pairs/s, peak {gib(peer['peak'])}")
        ratio = ours["pairs_per_s"] / peer_rate
        report.add("2 train", f"{label} crossrank / CrossEncoderTrainer", f"{ratio:.2f}x", f">= {TARGET_RATIO}",
                   ratio >= TARGET_RATIO, speed_target=True)
        pair_tokenizer = PairTokenizer(load_tokenizer(folder), cfg.model)
        lengths = [len(ids) for e in examples
                   for ids, _ in pair_tokenizer.encode([stream.topics[e.qid]] * len(e.docnos),
                                                       [stream.passages[d] for d in e.docnos])]
        ideal = 1 / (3 * ideal_seconds_per_pair(lengths, config, rates))
        report.add("5 gemm", f"{label} training ideal (forward + backward = 3x forward)",
                   f"{ideal:.0f} pairs/s; crossrank {ours['pairs_per_s'] / ideal:.2f}, peer {peer_rate / ideal:.2f} of it")


def set_encoder_section(folder: str, data: dict[str, Path], candidates, plan: Plan, device: torch.device,
                        tmp: Path, report: Report) -> None:
    """Section 3: one Set-Encoder training step on a `depth`-passage list, then re-ranking the workload."""
    from crossrank.config import EvalConfig, ModelConfig
    from crossrank.inference.rerank import score_candidates
    from crossrank.models.loading import load_model

    section = "3 set-encoder"
    files = [ROOT / "configs" / "backbones" / "set-encoder.yaml", ROOT / "configs" / "objectives" / "KD.yaml",
             ROOT / "configs" / "set-encoder" / "KD.yaml"]
    overrides = [f"model.path={folder}", "model.name=set-encoder-electra", f"data.train={data['KD']}",
                 f"data.num_negatives={plan.depth - 1}", f"data.depth={plan.depth}", "train.accumulation=1",
                 "data.min_candidates=0",  # the recipe's 100-candidate filter: the dry run's lists are shorter
                 "train.max_steps=2", "train.precision=bf16"]  # step 1 warms up, step 2 is timed
    result = train_ours(files, overrides, tmp / "set-encoder", 1, device)
    report.add(section, f"training step, 1 list x {plan.depth} passages, gradient checkpointing, bf16",
               f"{plan.depth / result['pairs_per_s']:.2f} s/step, peak {gib(result['peak'])}, "
               f"loss {result['loss']:.3f}", "runs, finite loss", result["loss"] == result["loss"])
    model, tokenizer = load_model(folder, ModelConfig(kind="set-encoder", truncation="per_field"), device)
    cfg = EvalConfig(precision="bf16", batch_tokens=plan.batch_tokens)
    score_candidates(model, tokenizer, candidates, cfg)  # warm-up
    with PeakMemory(device) as peak:
        started = time.perf_counter()
        run = score_candidates(model, tokenizer, candidates, cfg)
        sync(device)
        seconds = time.perf_counter() - started
    scored = sum(len(r) for r in run.values())
    report.add(section, f"re-rank {len(run)} queries x {plan.depth} passages, bf16",
               f"{seconds:.2f} s ({seconds / len(run) * 1e3:.0f} ms/query), peak +{gib(peak.gib)}",
               "every pair scored", scored == candidates.num_pairs)
    del model
    free(device)


# ---------------------------------------------------------------------------------------------------------
# 4: torchrun


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def checkpoint_step(out: Path) -> int:
    state = out / "checkpoint" / "state.pt"
    return torch.load(state, weights_only=True)["state"]["step"] if state.is_file() else -1


def torchrun_section(model: str, data: dict[str, Path], tmp: Path, report: Report) -> None:
    """Section 4: train.py under torchrun (2 steps + checkpoint, then the same command resumes to step 3), and
    an NCCL (gloo on CPU) probe."""
    section, out = "4 torchrun", tmp / "smoke"
    command = ["train.py", "--config", "configs/backbones/minilm.yaml", "--config", "configs/objectives/CL.yaml",
               f"model.path={model}", f"data.train={data['CL']}", "data.num_negatives=7",
               "train.queries_per_batch=2", "train.accumulation=1", "train.save_every=1",
               "train.eval_every=1000000", f"train.output_dir={out}"]
    first = torchrun(command + ["train.max_steps=2"])
    ok = first.returncode == 0 and checkpoint_step(out) == 2
    report.add(section, "train.py: 2 steps + checkpoint", f"exit {first.returncode}, checkpoint at step "
               f"{checkpoint_step(out)}", "exit 0, step 2", ok)
    if not ok:
        print(first.stdout[-3000:], first.stderr[-3000:], file=sys.stderr)
    second = torchrun(command + ["train.max_steps=3"])
    resumed = "resuming at step 2" in second.stdout
    ok = second.returncode == 0 and resumed and checkpoint_step(out) == 3
    report.add(section, "train.py again: resume", f"exit {second.returncode}, {'resumed' if resumed else 'NOT resumed'}"
               f" at step 2, checkpoint at step {checkpoint_step(out)}", "exit 0, step 3", ok)
    if not ok:
        print(second.stdout[-3000:], second.stderr[-3000:], file=sys.stderr)
    ok, backend = probe_ddp()
    report.add(section, "DDP probe (world of 1, this process): process group, DDP backward, all_reduce",
               f"backend {backend}, {'correct' if ok else 'WRONG'} gradient and sum", "nccl on CUDA, correct", ok)


def probe_ddp() -> tuple[bool, str]:
    """Join a one-process group (NCCL on CUDA, gloo on CPU) over a local TCP store, run one DDP backward and
    one all_reduce, leave the group. crossrank's `setup_distributed` joins no group for a world of 1, so this
    is what shows NCCL working on a one-GPU machine (torchrun creates the same store from its environment)."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 1, is_master=True)
    dist.init_process_group("nccl" if cuda else "gloo", store=store, rank=0, world_size=1,
                            **({"device_id": device} if cuda else {}))
    try:
        model = DistributedDataParallel(torch.nn.Linear(8, 1).to(device), device_ids=[device] if cuda else None)
        model(torch.ones(4, 8, device=device)).sum().backward()
        total = torch.full((1,), 3.0, device=device)
        dist.all_reduce(total)
        grad = model.module.weight.grad  # d/dw of sum over 4 rows of w . 1 = 4 everywhere
        ok = total.item() == 3.0 and bool(torch.equal(grad, torch.full_like(grad, 4.0)))
        return ok, dist.get_backend()
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# --pack: what the GPU machine lacks, in a folder to carry there


def pack(out: Path) -> None:
    """`out/minilm`: the packaged MiniLM with its weights stored in fp16 (43 MB instead of the 84 MB wheel,
    which exceeds what travels; `float32_copy` turns them back into float32 there), tokenizer included; `out/wheels`: the
    pure-Python wheels of requirements.txt's packages that the GPU image lacks (bench/gpu.sh installs them)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from crossrank.models.mono import resolve_model_path

    source, target = Path(resolve_model_path(MINILM)), out / "minilm"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.is_file() and file.suffix != ".safetensors" and file.name != "README.md":
            shutil.copy2(file, target / file.name)
    weights = load_file(str(source / "model.safetensors"))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
              str(target / "model.safetensors"), metadata={"format": "pt"})
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "py", "-d", str(out / "wheels"), *WHEELS],
                   check=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"{out}: {size / 2**20:.0f} MiB (carry it: run(..., carry=['{out.name}']))")


# ---------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (gloo), a few seconds")
    parser.add_argument("--sections", default="1,2,3,4", help="comma-separated: 1 rerank, 2 train, "
                        "3 set-encoder, 4 torchrun (section 5's GEMM rows come with 1 and 2)")
    parser.add_argument("--models", default="", help="comma-separated subset of section 1's models "
                        "(electra-base, roberta-base, minilm; -tiny in a dry run); default all")
    parser.add_argument("--compile", action="store_true", help="a dry run compiles too (~1 min on 2 cores)")
    parser.add_argument("--min-tau", type=float, default=MIN_TAU, help="Kendall tau gate (real-weight model)")
    parser.add_argument("--minilm", default="", help="MiniLM folder (default: .gpu/minilm if packed, else the "
                        "installed package)")
    parser.add_argument("--data", type=Path, default=DL19, help="TREC DL 2019 folder (synthetic text if absent)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds: no step starts after this, and "
                        "a step still running at budget + 90 s is stopped (the GPU machine allows 600 s a command)")
    parser.add_argument("--pack", type=Path, help="write the folder to carry to the GPU machine, and exit")
    args = parser.parse_args()
    if args.pack:
        pack(args.pack)
        return 0
    started, report = time.perf_counter(), Report(args.dry_run)
    try:
        check(args, report, started)
    except Exception as e:  # setup broke: still print the table and fail
        traceback.print_exc()
        report.add("0 setup", "models, workload, imports", error_text(e), "runs", False)
    return finish(report, started, args)


def check(args, report: Report, started: float) -> None:
    """Build the models and the workload, then run the chosen sections' steps within the time budget."""
    plan = DRY if args.dry_run else Plan()
    device = torch.device("cpu") if args.dry_run else torch.device("cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        report.add("0 setup", "CUDA device", "none found", "one GPU", False)
        return
    import sentence_transformers
    import transformers

    transformers.utils.logging.disable_progress_bar()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    print(f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, sentence-transformers "
          f"{sentence_transformers.__version__}", flush=True)
    sections = {s.strip() for s in args.sections.split(",")}
    with tempfile.TemporaryDirectory(prefix="crossrank-gpu-") as tmp_name:
        tmp = Path(tmp_name)
        minilm = minilm_path(args.minilm)
        models = build_models(tmp / "models", minilm, args.dry_run)
        electra_name = next(name for name in models if name.startswith("electra"))
        electra = models[electra_name]
        candidates, source = workload(args.data, plan.queries, plan.depth)
        print(f"workload: {source}, {len(candidates.run)} queries x {plan.depth} = {candidates.num_pairs} pairs",
              flush=True)
        data = write_training_data(tmp / "data", candidates)
        wanted = ({m.strip() for m in args.models.split(",") if m.strip()} or set(models)) if "1" in sections else set()
        def rerank_step(name: str, path: str) -> None:
            if name == "minilm":  # the gated model: a fitted head instead of a random one (see the module doc)
                path, fit = fit_head(path, candidates, tmp / "models" / "minilm-fitted", device)
                report.add("1 rerank", "minilm head fitted to the first-stage scores (ridge, fp32)", fit)
            rerank_model(name, path, candidates, plan, device, "eager", gate_tau=name == "minilm", args=args,
                         report=report)

        steps = [(f"1 rerank {name}", lambda name=name, path=path: rerank_step(name, path))
                 for name, path in models.items() if name in wanted]
        if "2" in sections:
            steps.append(("2 train", lambda: training_section(electra, data, plan, device, tmp, report)))
        if "3" in sections:
            steps.append(("3 set-encoder", lambda: set_encoder_section(electra, data, candidates, plan, device,
                                                                       tmp, report)))
        if "4" in sections:
            smoke = electra if args.dry_run else models["minilm"]  # the real MiniLM (fp32) on the GPU
            steps.append(("4 torchrun", lambda: torchrun_section(smoke, data, tmp, report)))
        if electra_name in wanted and (not args.dry_run or args.compile):
            # last: the one-off compile is the least predictable cost (a CPU compile takes ~1 min: not in the test)
            steps.append((f"1 rerank {electra_name} compiled", lambda: rerank_model(
                electra_name, electra, candidates, plan, device, "compiled", gate_tau=False, args=args,
                report=report)))
        run_steps(steps, args.budget, started, device, report)


def run_steps(steps: list, budget: float, started: float, device: torch.device, report: Report) -> None:
    """Each step in turn; an error or overrun becomes a FAIL row and the next step still runs. SIGALRM stops
    a step still running OVERRUN_S past the budget, so the table is printed inside the machine's limit."""
    import signal

    def overrun(signum, frame):
        raise TimeoutError(f"still running {budget + OVERRUN_S:.0f} s after the start")

    previous = signal.signal(signal.SIGALRM, overrun)
    try:
        for label, step in steps:
            section = " ".join(label.split()[:2])
            elapsed = time.perf_counter() - started
            if elapsed > budget:
                report.add(section, label, "skipped: over the time budget", f"start < {budget:.0f} s", False)
                continue
            signal.alarm(max(1, int(budget + OVERRUN_S - elapsed)))
            step_started = time.perf_counter()
            try:
                step()
            except Exception as e:  # one broken step must not hide the others' figures
                traceback.print_exc()
                report.add(section, label, error_text(e), "runs", False)
            finally:
                signal.alarm(0)
            print(f"({label}: {time.perf_counter() - step_started:.0f} s)", flush=True)
            free(device)
    finally:
        signal.signal(signal.SIGALRM, previous)


def error_text(e: Exception) -> str:
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return f"error: {type(e).__name__}: {first}"


def finish(report: Report, started: float, args) -> int:
    elapsed = time.perf_counter() - started
    if not args.dry_run:
        report.add("0 setup", "whole check on one GPU", f"{elapsed:.0f} s", "< 480", elapsed < 480,
                   speed_target=True)
    report.print_table()
    failed = report.failed()
    print(f"\nchecks failed = {len(failed)} of {len(report.rows)} rows in {elapsed:.0f} s (target == 0) "
          f"{'PASS' if not failed else 'FAIL'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
