#!/usr/bin/env python
"""Preprocessing throughput and memory on a generated 25M-line TREC run (50k queries x 500 candidates,
MS MARCO-like numeric docnos), against a naive `pandas.read_csv` load of the same file, in the same run.

Each side runs in its own fresh process, so peak RSS (ru_maxrss) is that side's alone. Targets (issue 3):
at least 3M run lines/s and peak RSS under 2 GB, whatever the input size.

    python bench/preprocessing.py [--lines 25000000] [--keep]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

OURS = """
import json, resource, sys, time
from crossrank.training.preprocessing import preprocess_run
qrels = {{str(q * 7): {{str(q * 11 % 8_841_823): 1}} for q in range(0, {queries}, 3)}}  # judged, as MS MARCO
start = time.perf_counter()
counts = preprocess_run({run!r}, qrels, {out!r}, evalperc=1.0, seed=42, progress=False)
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "lines": counts["run_lines"],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""

PANDAS = """
import json, resource, time
import pandas as pd
start = time.perf_counter()
df = pd.read_csv({run!r}, sep=" ", header=None, names=["qid", "q0", "docno", "rank", "score", "tag"],
                 dtype={{"qid": str, "docno": str}})
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "lines": len(df),
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def generate(path: Path, lines: int, depth: int = 500) -> None:
    """A sorted run: `lines / depth` queries, each with `depth` distinct docnos and decreasing scores."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.csv as pcsv

    rng = np.random.default_rng(0)
    queries = lines // depth
    with open(path, "wb") as f:
        for first in range(0, queries, 2000):
            n = min(2000, queries - first)
            qid = np.repeat(np.arange(first, first + n) * 7, depth)
            # distinct docnos per query: a random offset plus a random stride over the 8.8M MS MARCO ids
            docno = (rng.integers(0, 8_841_823, (n, 1)) + np.arange(depth) * 17_683) % 8_841_823
            rank = np.tile(np.arange(1, depth + 1), n)
            score = np.round(np.tile(80.0 - np.arange(depth) * 0.05, n), 4)
            table = pa.table({"qid": qid, "q0": pa.array(["Q0"] * len(qid)), "docno": docno.reshape(-1),
                              "rank": rank, "score": score, "tag": pa.array(["colbert"] * len(qid))})
            pcsv.write_csv(table, f, pcsv.WriteOptions(include_header=False, delimiter=" ", quoting_style="none"))


def measure(code: str) -> dict:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=25_000_000)
    parser.add_argument("--keep", action="store_true", help="keep the generated run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=ROOT / "data" if (ROOT / "data").is_dir() else None) as tmp:
        run = Path(tmp) / "bench.run"
        start = time.perf_counter()
        generate(run, args.lines)
        print(f"generated {run.stat().st_size / 1e9:.2f} GB, {args.lines:,} lines in {time.perf_counter() - start:.0f}s")
        ours = measure(OURS.format(root=str(ROOT), run=str(run), out=str(Path(tmp) / "out"),
                                   queries=args.lines // 500 * 7))
        peer = measure(PANDAS.format(run=str(run)))
        for name, r in (("crossrank preprocess_run (read+validate+split+write)", ours),
                        ("pandas.read_csv (load only)", peer)):
            print(f"{name}: {r['lines'] / r['seconds'] / 1e6:.2f}M lines/s, {r['seconds']:.1f}s, "
                  f"peak RSS {r['rss_mb']:.0f} MB")
        if args.keep:
            run.rename(ROOT / "data" / "bench.run")
    rate = ours["lines"] / ours["seconds"] / 1e6
    ok = rate >= 3.0 and ours["rss_mb"] < 2048
    print(f"peak RSS = {ours['rss_mb']:.0f} MB (target < 2048 MB) {'PASS' if ours['rss_mb'] < 2048 else 'FAIL'}")
    print(f"speed vs pandas.read_csv = {rate / (peer['lines'] / peer['seconds'] / 1e6):.1f}x")
    print(f"preprocessing throughput = {rate:.2f}M lines/s (target >= 3.00M lines/s) {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
