#!/usr/bin/env python
"""Re-ranking throughput: crossrank's inference (length-sorted, token-budget batches), eager and with
`eval.compile=true` (torch.compile, dynamic shapes; its one-off compile is timed and reported apart), against
sentence-transformers' `CrossEncoder.predict` (its defaults: batch_size 32; it also sorts pairs by length) on
the same checkpoint, the same pairs and the same max length (256, pair truncation), fp32, in the same run,
alternating the contenders so machine load hits all of them.

Workload: MS MARCO-like lengths, queries 3-12 words and passages 20-150 words of English text (the demo
vocabulary), 20 queries x 20 candidates. Model: a MonoEncoder made from the packaged all-MiniLM-L6-v2
(random head, seeded) and saved; CrossEncoder loads the folder unchanged. Scores must agree (raw logits).

Second figure: efficiency against the hardware. Useful FLOPs per pair (unpadded tokens, every matmul incl.
attention) divided by a measured fp32 GEMM rate at the model's FFN shape gives an ideal pairs/s; we report the
compiled pairs/s as a fraction of it. These are the full model's FLOPs: crossrank skips the last layer's work
for every token but [CLS] (the head reads nothing else), so the bench also prints the GFLOP/s on the FLOPs it
actually executes. Last line: the compiled speed-up over the peer (target >= 1.3); the eager one is above it.

    python bench/inference.py [--queries 20] [--docs 20] [--rounds 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from crossrank.config import EvalConfig, ModelConfig  # noqa: E402
from crossrank.demo import ASPECTS, FILLER, THEMES  # noqa: E402
from crossrank.inference import Candidates, load_model, score_candidates  # noqa: E402
from crossrank.models import MonoEncoder, load_tokenizer  # noqa: E402

MAX_LENGTH = 256


def workload(n_queries: int, n_docs: int, seed: int = 0) -> Candidates:
    rng = random.Random(seed)
    vocab = sorted({w for words in THEMES.values() for w in words.split()} | set(ASPECTS)
                   | {w for s in FILLER for w in s.split()})
    queries = {f"q{i}": " ".join(rng.choices(vocab, k=rng.randint(3, 12))) for i in range(n_queries)}
    texts, run = {}, {}
    for q in queries:
        run[q] = []
        for j in range(n_docs):
            docno = f"{q}d{j}"
            texts[docno] = " ".join(rng.choices(vocab, k=rng.randint(20, 150)))
            run[q].append((docno, float(n_docs - j)))
    return Candidates(run, queries, texts)


def kendall_tau_per_query(pairs: list[tuple[str, str]], a: list[float], b: list[float]) -> float:
    """Mean over queries of Kendall's tau between two scorings of the same candidates."""
    from scipy.stats import kendalltau

    by_query: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(pairs):
        by_query.setdefault(q, []).append(i)
    taus = [kendalltau([a[i] for i in rows], [b[i] for i in rows]).statistic for rows in by_query.values()]
    return sum(taus) / len(taus)


def flops_per_pair(lengths: list[int], config) -> float:
    """Mean matmul FLOPs of one pair: per layer 8·L·H² (Q, K, V, O), 4·L·H·I (FFN), 4·L²·H (QKᵀ and AV)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    total = sum(n * (8 * L * h * h + 4 * L * h * i + 4 * L * L * h) + 2 * h * h for L in lengths)
    return total / len(lengths)


def executed_flops_per_pair(lengths: list[int], config) -> float:
    """What crossrank computes: the last layer only for the first token (keys/values still for every token)."""
    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    last = [4 * L * h * h + 4 * h * h + 4 * h * i + 4 * L * h for L in lengths]
    return flops_per_pair(lengths, config) * (n - 1) / n + sum(last) / len(lengths)


def gemm_rate(m: int, k: int, n: int, seconds: float = 3.0) -> float:
    """fp32 FLOP/s of torch.mm at [m, k] x [k, n], best of repeated timings."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    torch.mm(a, b)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * m * k * n / best


def main() -> None:
    parser = argparse.ArgumentParser(description="crossrank inference vs sentence-transformers CrossEncoder")
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--docs", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    args = parser.parse_args()
    from sentence_transformers import CrossEncoder

    torch.manual_seed(0)
    candidates = workload(args.queries, args.docs)
    pairs_q = [(q, d) for q, r in candidates.run.items() for d, _ in r]
    pairs = [(candidates.queries[q], candidates.texts[d]) for q, d in pairs_q]
    # 4096 tokens per batch: on CPU, batches that stay in cache beat the GPU-sized default (16384)
    model_cfg, eval_cfg = ModelConfig(max_length=MAX_LENGTH), EvalConfig(batch_tokens=args.batch_tokens)
    with tempfile.TemporaryDirectory() as folder:
        MonoEncoder.from_pretrained("packaged:all-MiniLM-L6-v2").save_pretrained(folder)
        load_tokenizer("packaged:all-MiniLM-L6-v2").save_pretrained(folder)
        ours_model, tokenizer = load_model(folder, model_cfg, torch.device("cpu"))
        compiled_model, _ = load_model(folder, model_cfg, torch.device("cpu"), compile=True)
        peer = CrossEncoder(folder, device="cpu", max_length=MAX_LENGTH)
    lengths = [len(ids) for ids, _ in tokenizer.encode([p[0] for p in pairs], [p[1] for p in pairs])]
    print(f"{len(pairs)} pairs, tokens per pair: mean {sum(lengths) / len(lengths):.0f}, "
          f"min {min(lengths)}, max {max(lengths)}; torch threads {torch.get_num_threads()}")

    def scorer(model, cfg=eval_cfg):
        def run() -> list[float]:
            run = score_candidates(model, tokenizer, candidates, cfg)
            scores = {(q, d): s for q, r in run.items() for d, s in r}
            return [scores[p] for p in pairs_q]
        return run

    def run_peer() -> list[float]:
        return peer.predict(pairs, batch_size=32, activation_fn=torch.nn.Identity(), show_progress_bar=False).tolist()

    # warm-up; for the compiled model this is the one-off compile (two shapes: static, then dynamic)
    sub = Candidates({q: candidates.run[q] for q in list(candidates.run)[:3]}, candidates.queries, candidates.texts)
    start = time.perf_counter()
    for _ in range(2):
        score_candidates(compiled_model, tokenizer, sub, dataclasses.replace(eval_cfg, block_queries=1))
    print(f"torch.compile warm-up: {time.perf_counter() - start:.0f} s (once per process)")
    score_candidates(ours_model, tokenizer, sub, eval_cfg)
    peer.predict(pairs[:64], batch_size=32, show_progress_bar=False)
    contenders = {"crossrank": scorer(ours_model), "crossrank compiled": scorer(compiled_model),
                  "CrossEncoder.predict": run_peer}
    bf16_cfg = dataclasses.replace(eval_cfg, precision="bf16")  # not like-for-like: reported apart, below
    run_bf16 = scorer(ours_model, bf16_cfg)
    run_bf16()  # warm-up of the bf16 kernels
    best = dict.fromkeys(contenders, float("inf"))
    reference = None
    config = ours_model.encoder.config
    gemm_shape = (2048, config.hidden_size, config.intermediate_size)  # the FFN's GEMM at a typical batch
    rate = 0.0
    for _ in range(args.rounds):
        rate = max(rate, gemm_rate(*gemm_shape, seconds=1.0))  # measured between the contenders, best of rounds
        for name, fn in contenders.items():
            start = time.perf_counter()
            scores = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            reference = reference or scores
            diff = max(abs(a - b) for a, b in zip(reference, scores))
            assert diff < 1e-3, f"{name}: scores differ from crossrank's by up to {diff}"
    bf16_seconds = float("inf")
    for _ in range(args.rounds):
        start = time.perf_counter()
        bf16_scores = run_bf16()
        bf16_seconds = min(bf16_seconds, time.perf_counter() - start)
    for name, seconds in best.items():
        print(f"{name:>22}: {len(pairs) / seconds:7.1f} pairs/s ({seconds:.1f} s, best of {args.rounds})")
    print("scores agree (max |diff| < 1e-3 between all three)")
    peer_rate = len(pairs) / best["CrossEncoder.predict"]
    print(f"eager speed-up over the peer: {len(pairs) / best['crossrank'] / peer_rate:.2f}")

    tau = kendall_tau_per_query(pairs_q, reference, bf16_scores)
    print(f"eval.precision=bf16 on this CPU (autocast; AVX512-BF16): {len(pairs) / bf16_seconds:.1f} pairs/s = "
          f"{len(pairs) / bf16_seconds / peer_rate:.2f}x the fp32 peer; mean per-query Kendall tau vs fp32 "
          f"{tau:.3f} (other scores, so not the headline)")

    flops = flops_per_pair(lengths, config)
    ideal = rate / flops
    ours = len(pairs) / best["crossrank compiled"]
    efficiency = ours / ideal
    m, k, n = gemm_shape
    print(f"model: {flops / 1e9:.2f} GFLOP per pair; fp32 GEMM [{m}x{k}]x[{k}x{n}]: {rate / 1e9:.1f} GFLOP/s "
          f"-> ideal {ideal:.1f} pairs/s")
    executed = executed_flops_per_pair(lengths, config)
    print(f"we execute {executed / 1e9:.2f} GFLOP per pair (last layer for [CLS] only): {ours * executed / 1e9:.1f} "
          f"GFLOP/s, {ours * executed / rate:.2f} of the GEMM rate")
    print(f"efficiency (compiled) = {efficiency:.2f} of the GEMM-bound ideal (target >= 0.80) "
          f"{'PASS' if efficiency >= 0.8 else 'FAIL'}")
    ratio = ours / peer_rate
    print(f"speed-up (crossrank, eval.compile=true) over CrossEncoder.predict = {ratio:.2f} (target >= 1.3) "
          f"{'PASS' if ratio >= 1.3 else 'FAIL'}")


if __name__ == "__main__":
    main()
