"""Set-Encoder training memory per list size, with and without gradient checkpointing.

A Set-Encoder list cannot be split into chunks (its passages attend to each other's [INT] states), so its memory
is bounded with `model.gradient_checkpointing=true` instead of `train.batch_tokens`. Workload: MiniLM-L6 (real
weights), the first DL19 query's BM25 top-D passages (bench/set_encoder.py's workload; synthetic text if absent),
query <= 32 / passage <= 256 tokens, one training forward + backward (train mode, dropout on, no pseudo-states) in a
fresh child process per point; the figure is the rise of the peak RSS over the RSS before the step (VmHWM reset
through /proc/self/clear_refs, fixed mmap threshold), as in bench/set_encoder.py. Without checkpointing only the
small lists are run (100 passages need ~15 GB, more than a shared machine can spare).

Last line: `set-encoder training peak extra memory at 100 passages, checkpointed = <GiB> (target <= 4) PASS|FAIL`.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("bench_set_encoder", HERE / "set_encoder.py")
inference_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inference_bench)
SIZES = {True: [10, 25, 50, 100], False: [10, 25]}  # checkpointing -> list sizes
TARGET_GIB = 4.0


def child(depth: int, checkpointing: bool) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    queries, passages, _ = inference_bench.workload(1, depth)
    model, encode = inference_bench.build("set", 256)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    batch = encode(queries[0], passages[0])
    import ctypes
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = inference_bench.rss_kb("VmRSS")
    model(**batch).sum().backward()  # [1, D] scores
    print(json.dumps({"peak_mib": (inference_bench.rss_kb("VmHWM") - before) / 1024,
                      "tokens": int(batch["attention_mask"].sum())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.child:
        return child(args.child, bool(args.checkpointing))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "BENCH_THREADS": str(torch.get_num_threads())}
    peaks = {}
    for checkpointing in (True, False):
        for depth in SIZES[checkpointing]:
            out = subprocess.run([sys.executable, __file__, "--child", str(depth), "--checkpointing",
                                  str(int(checkpointing))], env=env, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            peaks[checkpointing, depth] = result["peak_mib"]
            print(f"{depth:4d} passages ({result['tokens']} tokens), gradient checkpointing "
                  f"{'on ' if checkpointing else 'off'}: peak extra memory {result['peak_mib']:7.0f} MiB")
    value = peaks[True, 100] / 1024
    print(f"set-encoder training peak extra memory at 100 passages, checkpointed = {value:.2f} GiB "
          f"(target <= {TARGET_GIB}) {'PASS' if value <= TARGET_GIB else 'FAIL'}")


if __name__ == "__main__":
    main()
