#!/usr/bin/env python
"""CPU re-ranking throughput and ranking agreement, every contender in one run on the same pairs (real text:
TREC DL 2019 BM25 top-100 passages from ../shared/data; a synthetic MS MARCO-like workload only when that data
is absent, and then it says so), max length 256 (pair truncation), alternating the contenders so that machine
load hits all of them:

- crossrank (length-sorted token-budget batches, last layer for [CLS] only) at eval.precision fp32 (eager and
  `eval.compile=true`), bf16 (autocast) and int8 (dynamic quantisation of the Linear layers);
- sentence-transformers' default `CrossEncoder.predict` (fp32 torch, batch 32, length-sorted);
- its CPU backends: `backend="onnx"` is ONNX Runtime over the model's ONNX export and
  `export_dynamic_quantized_onnx_model` is ONNX Runtime's dynamic int8 quantisation of it; `backend="openvino"`
  is OpenVINO over the same export. sentence-transformers reaches both through optimum / optimum-intel, which do
  not import with transformers 5 (optimum-onnx wants transformers < 4.58, optimum-intel 1.15 imports
  `transformers.onnx`), so the bench builds the same thing directly: `torch.onnx.export` of the checkpoint,
  `onnxruntime.quantization.quantize_dynamic` (QInt8 weights, per tensor: what optimum's avx512_vnni config
  passes), and the same predict loop (batches of 32 pairs in length order). Needs requirements-bench.txt;
  a backend that is not installed is skipped and named.

Prints the CPU model and the flags that decide precision, pairs/s of every contender and its mean per-query
Kendall tau against crossrank fp32. "Exact enough" = tau >= 0.98. Then the fp32 figures (speed-up over the
default peer, fraction of the GEMM-bound ideal: useful FLOPs per pair over a measured fp32 GEMM rate at the
FFN's shape) and, last, the speed-up of our fastest exact-enough precision over the peer's fastest exact-enough
backend (target >= 1.3).

`--model` should be a trained cross-encoder: the default, the packaged MiniLM with a random (seeded) head,
scores almost at random, so its tau says little and nDCG nothing. `--ndcg` re-ranks all 43 DL19 queries' BM25
top-100 at fp32, int8 and bf16 and prints nDCG@10 of each.

    python bench/inference.py [--model FOLDER] [--queries 10] [--docs 40] [--rounds 2] [--ndcg]
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

import torch  # noqa: E402

from crossrank.config import EvalConfig, ModelConfig  # noqa: E402
from crossrank.demo import ASPECTS, FILLER, THEMES  # noqa: E402
from crossrank.inference.candidates import Candidates, load_candidates  # noqa: E402
from crossrank.inference.rerank import score_candidates
from crossrank.models.loading import load_model
from crossrank.models.mono import MonoEncoder, load_tokenizer, resolve_model_path  # noqa: E402
from crossrank.models.precision import cpu_flags, cpu_model, relevant_flags, resolve_precision  # noqa: E402

MAX_LENGTH = 256
EXACT_ENOUGH = 0.98  # mean per-query Kendall tau against fp32
DL19 = ROOT.parent / "shared" / "data" / "trec-dl" / "dl19"


def synthetic_workload(n_queries: int, n_docs: int, seed: int = 0) -> Candidates:
    """Fallback without ../shared/data: MS MARCO-like lengths (queries 3-12, passages 20-150 words)."""
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


def dl19_candidates() -> Candidates:
    return load_candidates(str(DL19 / "runs" / "bm25.top100.run"), str(DL19 / "queries.jsonl"),
                           str(DL19 / "corpus.jsonl"), depth=100)


def subset(candidates: Candidates, n_queries: int, n_docs: int) -> Candidates:
    qids = sorted(candidates.run)[:n_queries]
    return Candidates({q: candidates.run[q][:n_docs] for q in qids}, candidates.queries, candidates.texts)


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


def onnx_export(folder: str) -> str:
    """The checkpoint as ONNX (what optimum exports for sentence-transformers' backend="onnx")."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    example = AutoTokenizer.from_pretrained(folder)(["a query"] * 2, ["a passage", "b"], return_tensors="pt",
                                                    padding=True)
    # positional order of the model's forward (the tokenizer's dict has another: token_type_ids before the mask)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in example]
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    path = f"{folder}/model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(example[n] for n in names), path, input_names=names, output_names=["logits"],
                          dynamic_axes={**axes, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path


def onnx_peers(folder: str, pairs: list[tuple[str, str]]) -> dict:
    """sentence-transformers' CPU backends rebuilt directly (see the module doc): name -> predict function."""
    import numpy as np
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))  # as predict does

    def predictor(run_batch):
        def predict() -> list[float]:
            scores = [0.0] * len(pairs)
            for start in range(0, len(order), 32):
                rows = order[start: start + 32]
                batch = tokenizer([pairs[i][0] for i in rows], [pairs[i][1] for i in rows], padding=True,
                                  truncation=True, max_length=MAX_LENGTH, return_tensors="np")
                for i, value in zip(rows, np.asarray(run_batch(dict(batch))).reshape(-1).tolist()):
                    scores[i] = value
            return scores
        return predict

    path, peers = onnx_export(folder), {}
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(path, f"{folder}/model_qint8.onnx", weight_type=QuantType.QInt8, per_channel=False)
        for name, file in (("ST onnx (ORT) fp32", path), ("ST onnx (ORT) int8", f"{folder}/model_qint8.onnx")):
            session = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
            peers[name] = predictor(lambda b, s=session: s.run(None, {k: v.astype(np.int64) for k, v in b.items()})[0])
        print(f"onnxruntime {ort.__version__}: intra-op threads default ({torch.get_num_threads()} cores)")
    except ImportError:
        print("onnxruntime not installed (pip install -r requirements-bench.txt): ONNX contenders skipped")
    try:
        import openvino as ov

        core = ov.Core()
        default = core.compile_model(path, "CPU")  # what backend="openvino" gets: bf16 where the CPU has it
        hint = default.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        exact = core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        peers[f"ST openvino ({hint})"] = predictor(lambda b, c=default: c(b)[0])
        if hint != "f32":
            peers["ST openvino f32"] = predictor(lambda b, c=exact: c(b)[0])
        print(f"openvino {ov.__version__.split('-')[0]}: default inference precision on this CPU {hint}")
    except ImportError:
        print("openvino not installed (pip install -r requirements-bench.txt): OpenVINO contender skipped")
    return peers


def timed(fn, rounds: int) -> tuple[float, list[float]]:
    best, scores = float("inf"), []
    for _ in range(rounds):
        start = time.perf_counter()
        scores = fn()
        best = min(best, time.perf_counter() - start)
    return best, scores


def ndcg_report(model, tokenizer, eval_cfg: EvalConfig) -> None:
    """nDCG@10 of all 43 DL19 queries x BM25 top-100 at fp32, int8 and bf16, and tau against fp32."""
    from crossrank.evaluation.metrics import evaluate, parse_metrics
    from crossrank.data.qrels import read_qrels
    from crossrank.data.texts import read_topics

    candidates = dl19_candidates()
    qrels, topics = read_qrels(str(DL19 / "qrels.tsv")), read_topics(str(DL19 / "queries.jsonl"))
    metric = parse_metrics(["nDCG@10"], 2)
    pairs_q = [(q, d) for q, r in candidates.run.items() for d, _ in r]
    results = {}
    for precision in ("fp32", "int8", "bf16"):
        run = score_candidates(model, tokenizer, candidates, dataclasses.replace(eval_cfg, precision=precision))
        scores = {(q, d): s for q, r in run.items() for d, s in r}
        results[precision] = (evaluate(run, qrels, metric, topics).means["nDCG@10"], [scores[p] for p in pairs_q])
    bm25 = evaluate({q: r for q, r in candidates.run.items()}, qrels, metric, topics).means["nDCG@10"]
    base, reference = results["fp32"]
    print(f"DL19 BM25 top-100, 43 queries, {len(pairs_q)} pairs: nDCG@10 BM25 {bm25:.4f}, fp32 {base:.4f}")
    for precision in ("int8", "bf16"):
        value, scores = results[precision]
        print(f"  {precision}: nDCG@10 {value:.4f} ({value - base:+.4f} vs fp32; target |diff| <= 0.005 "
              f"{'PASS' if abs(value - base) <= 0.005 else 'FAIL'}), mean per-query Kendall tau vs fp32 "
              f"{kendall_tau_per_query(pairs_q, reference, scores):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description="crossrank CPU inference vs sentence-transformers' backends")
    parser.add_argument("--model", default="", help="a trained mono cross-encoder (default: MiniLM, random head)")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--docs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=4096)
    parser.add_argument("--ndcg", action="store_true", help="also nDCG@10 on all DL19 queries per precision")
    args = parser.parse_args()
    from sentence_transformers import CrossEncoder

    flags = cpu_flags()
    print(f"CPU: {cpu_model()}; precision flags: {' '.join(relevant_flags(flags)) or 'none'}; torch "
          f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {torch.get_num_threads()} threads; "
          f"eval.precision=auto -> {resolve_precision('auto', 'cpu', flags)}")
    torch.manual_seed(0)
    if DL19.is_dir():
        candidates = subset(dl19_candidates(), args.queries, args.docs)
        print(f"workload: TREC DL 2019 BM25 top-{args.docs} of {args.queries} queries (real text)")
    else:
        candidates = synthetic_workload(args.queries, args.docs)
        print(f"workload: SYNTHETIC ({DL19} is absent), {args.queries} x {args.docs}")
    pairs_q = [(q, d) for q, r in candidates.run.items() for d, _ in r]
    pairs = [(candidates.queries[q], candidates.texts[d]) for q, d in pairs_q]
    # 4096 tokens per batch: on CPU, batches that stay in cache beat the GPU-sized default (16384)
    model_cfg, eval_cfg = ModelConfig(max_length=MAX_LENGTH), EvalConfig(batch_tokens=args.batch_tokens,
                                                                         precision="fp32")
    with tempfile.TemporaryDirectory() as folder:
        if args.model:
            source = resolve_model_path(args.model)
            print(f"model: {args.model}")
        else:
            print("model: packaged all-MiniLM-L6-v2 with a RANDOM head (scores say little; pass --model)")
            source = "packaged:all-MiniLM-L6-v2"
        MonoEncoder.from_pretrained(source).save_pretrained(folder)
        load_tokenizer(source).save_pretrained(folder)
        ours_model, tokenizer = load_model(folder, model_cfg, torch.device("cpu"))
        compiled_model, _ = load_model(folder, model_cfg, torch.device("cpu"), compile=True)
        peer = CrossEncoder(folder, device="cpu", max_length=MAX_LENGTH)
        backends = onnx_peers(folder, pairs)
    lengths = [len(ids) for ids, _ in tokenizer.encode([p[0] for p in pairs], [p[1] for p in pairs])]
    print(f"{len(pairs)} pairs, tokens per pair: mean {sum(lengths) / len(lengths):.0f}, "
          f"min {min(lengths)}, max {max(lengths)}")

    def scorer(model, precision: str):
        cfg = dataclasses.replace(eval_cfg, precision=precision)

        def run() -> list[float]:
            run = score_candidates(model, tokenizer, candidates, cfg)
            scores = {(q, d): s for q, r in run.items() for d, s in r}
            return [scores[p] for p in pairs_q]
        return run

    def run_peer() -> list[float]:
        return peer.predict(pairs, batch_size=32, activation_fn=torch.nn.Identity(), show_progress_bar=False).tolist()

    # warm-up; for the compiled model this is the one-off compile (two shapes: static, then dynamic)
    sub = subset(candidates, 3, args.docs)
    start = time.perf_counter()
    for _ in range(2):
        score_candidates(compiled_model, tokenizer, sub, dataclasses.replace(eval_cfg, block_queries=1))
    print(f"torch.compile warm-up: {time.perf_counter() - start:.0f} s (once per process)")
    ours = {"crossrank fp32": scorer(ours_model, "fp32"), "crossrank fp32 compiled": scorer(compiled_model, "fp32"),
            "crossrank bf16": scorer(ours_model, "bf16"), "crossrank int8": scorer(ours_model, "int8")}
    peers = {"CrossEncoder.predict": run_peer, **backends}
    contenders = {**ours, **peers}
    for name, fn in contenders.items():  # warm-up: kernels, quantisation code paths, allocator
        if name != "crossrank fp32 compiled":  # compiled and warmed up above
            fn()
    best = dict.fromkeys(contenders, float("inf"))
    scores: dict[str, list[float]] = {}
    config = ours_model.encoder.config
    gemm_shape = (2048, config.hidden_size, config.intermediate_size)  # the FFN's GEMM at a typical batch
    rate = 0.0
    for _ in range(args.rounds):
        rate = max(rate, gemm_rate(*gemm_shape, seconds=1.0))  # measured between the contenders, best of rounds
        for name, fn in contenders.items():
            seconds, scores[name] = timed(fn, 1)
            best[name] = min(best[name], seconds)
    reference = scores["crossrank fp32"]
    for name in ("crossrank fp32 compiled", "CrossEncoder.predict"):  # same arithmetic: same scores
        diff = max(abs(a - b) for a, b in zip(reference, scores[name]))
        assert diff < 1e-3, f"{name}: fp32 scores differ from crossrank's by up to {diff}"
    taus = {name: kendall_tau_per_query(pairs_q, reference, scores[name]) for name in contenders}
    print(f"{'contender':>26}  pairs/s   tau vs fp32   (best of {args.rounds} rounds)")
    for name in contenders:
        print(f"{name:>26}: {len(pairs) / best[name]:7.1f}   {taus[name]:.3f}"
              f"{'' if taus[name] >= EXACT_ENOUGH else '  (not exact enough: tau < 0.98)'}")

    rate_of = {name: len(pairs) / seconds for name, seconds in best.items()}
    peer_rate = rate_of["CrossEncoder.predict"]
    print(f"fp32 speed-up over CrossEncoder.predict: eager {rate_of['crossrank fp32'] / peer_rate:.2f}, compiled "
          f"{rate_of['crossrank fp32 compiled'] / peer_rate:.2f} (target >= 1.3)")
    flops = flops_per_pair(lengths, config)
    ideal = rate / flops
    fp32_best = max(rate_of["crossrank fp32"], rate_of["crossrank fp32 compiled"])
    m, k, n = gemm_shape
    print(f"model: {flops / 1e9:.2f} GFLOP per pair; fp32 GEMM [{m}x{k}]x[{k}x{n}]: {rate / 1e9:.1f} GFLOP/s "
          f"-> ideal {ideal:.1f} pairs/s")
    executed = executed_flops_per_pair(lengths, config)
    print(f"we execute {executed / 1e9:.2f} GFLOP per pair (last layer for [CLS] only): "
          f"{fp32_best * executed / 1e9:.1f} GFLOP/s, {fp32_best * executed / rate:.2f} of the GEMM rate")
    efficiency = fp32_best / ideal
    print(f"fp32 efficiency = {efficiency:.2f} of the GEMM-bound ideal (target >= 0.80) "
          f"{'PASS' if efficiency >= 0.8 else 'FAIL'}")
    if args.ndcg:
        ndcg_report(ours_model, tokenizer, eval_cfg)
    exact = [name for name in contenders if taus[name] >= EXACT_ENOUGH]
    our_best = max((n for n in exact if n in ours), key=rate_of.get)
    peer_best = max((n for n in exact if n in peers), key=rate_of.get)
    ratio = rate_of[our_best] / rate_of[peer_best]
    print(f"speed-up of our fastest exact-enough ({our_best}) over the peer's fastest exact-enough "
          f"({peer_best}) = {ratio:.2f} (target >= 1.3) {'PASS' if ratio >= 1.3 else 'FAIL'}")


if __name__ == "__main__":
    main()
