"""Set-Encoder vs MonoEncoder: time and peak memory per query at 100 passages, same backbone, same run.

Workload: `packaged:all-MiniLM-L6-v2` (real weights) as both models' backbone; the BM25 top-100 passages of
the first TREC DL 2019 query (`--queries`) from ../shared/data (a fixed synthetic text if absent); per-field
truncation, query <= 32 and passage <= 256 tokens (`--passage-length`; MS MARCO passages are mostly shorter,
so the batch is padded to the longest pair, as in real re-ranking). About 3 minutes on 2 busy CPU cores. The MonoEncoder scores `[CLS] q [SEP] p [SEP]`, the Set-Encoder
`[CLS] [INT] q [SEP] p [SEP]` with inter-passage attention: its one extra token is part of its cost.

Time: inference (eval, no_grad) of one query's 100 passages in one batch after a warm-up; the two models
alternate `--repeats` times and the figure is the median of the paired ratios (set / mono of the same round),
which cancels most of the load other jobs put on a shared machine. Peak memory: on CUDA `max_memory_allocated`; on CPU each model runs in a fresh
child process with a fixed mmap threshold, and the peak is the rise of the peak RSS (VmHWM, reset through
/proc/self/clear_refs) over the RSS before the forward pass.

Last line: `set-encoder time overhead = <ratio>x (target <= 1.15) PASS|FAIL`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from crossrank.config import ModelConfig  # noqa: E402
from crossrank.models.encoding import INTERACTION_TOKEN, PairTokenizer, encode_lists, load_set_tokenizer  # noqa: E402
from crossrank.models.mono import MonoEncoder, load_tokenizer  # noqa: E402
from crossrank.models.set_encoder import SetEncoder  # noqa: E402

BACKBONE = "packaged:all-MiniLM-L6-v2"
# ../shared/data next to the project (or next to the folder of git worktrees that holds it)
ROOT = Path(__file__).resolve().parent.parent
DL19 = next((p / "shared" / "data" / "trec-dl" / "dl19" for p in (ROOT.parent, ROOT.parent.parent)
             if (p / "shared" / "data" / "trec-dl" / "dl19").is_dir()), ROOT.parent / "shared" / "data")
TARGET = 1.15


def workload(num_queries: int, depth: int) -> tuple[list[str], list[list[str]], str]:
    """Queries and their top-`depth` passage texts: DL19 BM25 when available, else a synthetic stand-in."""
    if (DL19 / "runs" / "bm25.top100.run").is_file():
        from crossrank.data.texts import load_corpus, read_topics
        from crossrank.data.runs import load_run, sort_ranking
        run = load_run(DL19 / "runs" / "bm25.top100.run", depth=depth)
        qids = sorted(run)[:num_queries]
        topics = read_topics(DL19 / "queries.jsonl")
        docnos = {docno for qid in qids for docno, _ in run[qid]}
        corpus = load_corpus(DL19 / "corpus.jsonl", docnos)
        passages = [[corpus[docno] for docno, _ in sort_ranking(run[qid])] for qid in qids]
        return [topics[qid] for qid in qids], passages, f"TREC DL 2019 BM25 top-{depth}, {len(qids)} queries"
    text = " ".join(["the quick brown fox jumps over the lazy dog near the river bank"] * 30)
    return (["what does the fox do"] * num_queries, [[text] * depth for _ in range(num_queries)],
            f"synthetic passages, {num_queries} queries x {depth}")


def build(kind: str, passage_length: int):
    """(model, encode(query, passages) -> batch) for `mono` or `set`."""
    config = ModelConfig(truncation="per_field", query_length=32, passage_length=passage_length)
    if kind == "mono":
        model = MonoEncoder.from_pretrained(BACKBONE).eval()
        pair_tokenizer = PairTokenizer(load_tokenizer(BACKBONE), config)
        return model, lambda query, passages: pair_tokenizer.pad_list(pair_tokenizer.encode([query] * len(passages),
                                                                                          passages))
    tokenizer = load_set_tokenizer(BACKBONE)
    model = SetEncoder.from_pretrained(BACKBONE).eval()
    pair_tokenizer, interaction = PairTokenizer(tokenizer, config), tokenizer.convert_tokens_to_ids(INTERACTION_TOKEN)
    return model, lambda query, passages: encode_lists(pair_tokenizer, interaction, [query], [passages])


def rss_kb(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child_memory(kind: str, passage_length: int, num_queries: int, depth: int) -> None:
    """Runs in a fresh process: print the peak extra memory (MiB) of one forward pass as JSON."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    queries, passages, _ = workload(num_queries, depth)
    model, encode = build(kind, passage_length)
    batch = encode(queries[0], passages[0])
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = rss_kb("VmRSS")
    with torch.no_grad():
        model(**batch)
    print(json.dumps({"peak_mib": (rss_kb("VmHWM") - before) / 1024}))


def cpu_peak(kind: str, args) -> float:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "BENCH_THREADS": str(torch.get_num_threads())}
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--passage-length", str(args.passage_length),
                          "--queries", str(args.queries), "--depth", str(args.depth)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=1)
    parser.add_argument("--depth", type=int, default=100)
    parser.add_argument("--passage-length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["mono", "set"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.child:
        return child_memory(args.child, args.passage_length, args.queries, args.depth)

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    queries, passages, source = workload(args.queries, args.depth)
    models = {kind: build(kind, args.passage_length) for kind in ("mono", "set")}
    batches = {kind: [{k: v.to(device) for k, v in encode(q, ps).items()} for q, ps in zip(queries, passages)]
               for kind, (_, encode) in models.items()}
    for model, _ in models.values():
        model.to(device)
    tokens = {kind: int(sum(b["attention_mask"].sum() for b in bs)) for kind, bs in batches.items()}
    print(f"workload: {source}; query <= 32, passage <= {args.passage_length} tokens; {device}, "
          f"{torch.get_num_threads()} threads; tokens mono {tokens['mono']}, set {tokens['set']}")

    def run(kind: str) -> float:
        model = models[kind][0]
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        with torch.no_grad():
            for batch in batches[kind]:
                model(**batch)
        sync()
        return (time.perf_counter() - start) / len(batches[kind])

    run("mono"), run("set")  # warm-up
    times: dict[str, list[float]] = {"mono": [], "set": []}
    for _ in range(args.repeats):
        for kind in ("mono", "set"):  # alternate, so load on the shared machine hits both alike
            times[kind].append(run(kind))
    median = {kind: statistics.median(t) for kind, t in times.items()}
    for kind in ("mono", "set"):
        print(f"{kind:>4}: {median[kind]:.3f} s per query of {args.depth} passages "
              f"(runs: {', '.join(f'{t:.3f}' for t in times[kind])})")

    if device.type == "cuda":
        peak = {}
        for kind, (model, _) in models.items():
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            with torch.no_grad():
                model(**batches[kind][0])
            peak[kind] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = {kind: cpu_peak(kind, args) for kind in ("mono", "set")}
    print(f"peak extra memory per query: mono {peak['mono']:.0f} MiB, set {peak['set']:.0f} MiB, "
          f"ratio {peak['set'] / peak['mono']:.2f}x")
    ratio = statistics.median(s / m for s, m in zip(times["set"], times["mono"]))
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"set-encoder time overhead = {ratio:.3f}x (target <= {TARGET}) {verdict}")


if __name__ == "__main__":
    main()
