"""bench/gpu.py --dry-run: the GPU check's code paths on CPU with tiny shapes (gloo instead of NCCL), so the script
is known to run before a GPU machine is lent. Checks that every section's rows are in the table, that the exit
status is 0 when all checks pass and 1 when one fails."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu.py"


def dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH), "--dry-run", *args], capture_output=True, text=True,
                          timeout=600)


def table_rows(stdout: str) -> list[list[str]]:
    """The printed table's rows (after its header line), split into columns on runs of 2+ spaces."""
    import re

    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("section "))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def test_dry_run_prints_every_section_and_exits_0():
    # the default gate (tau >= 0.98): MiniLM's head is fitted to the workload first, so its scores separate the
    # passages and the tau measures bf16's rounding, not a random head's near-constant scores
    done = dry_run()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = table_rows(done.stdout)
    checks = {(r[0], r[1]): r[-1] for r in rows}
    expected = [
        ("1 rerank", "electra-tiny crossrank eager bf16"), ("1 rerank", "roberta-tiny crossrank eager bf16"),
        ("1 rerank", "minilm crossrank eager bf16"), ("1 rerank", "minilm CrossEncoder.predict bs32 bf16"),
        ("1 rerank", "minilm head fitted to the first-stage scores (ridge, fp32)"),
        ("1 rerank", "minilm crossrank eager Kendall tau bf16 vs fp32 (real weights, fitted head)"),
        ("1 rerank", "electra-tiny crossrank eager / best CrossEncoder.predict"),
        ("2 train", "CL 2 x 8 crossrank train() bf16"), ("2 train", "CL 2 x 8 CrossEncoderTrainer bf16"),
        ("2 train", "KD 2 x 5 crossrank / CrossEncoderTrainer"),
        ("3 set-encoder", "training step, 1 list x 8 passages, gradient checkpointing, bf16"),
        ("3 set-encoder", "re-rank 3 queries x 8 passages, bf16"),
        ("4 torchrun", "train.py: 2 steps + checkpoint"), ("4 torchrun", "train.py again: resume"),
        ("4 torchrun", "DDP probe (world of 1, this process): process group, DDP backward, all_reduce"),
        ("5 gemm", "electra-tiny GEMM rate at the model's shapes (256 tokens)"),
        ("5 gemm", "CL 2 x 8 training ideal (forward + backward = 3x forward)"),
    ]
    missing = [key for key in expected if key not in checks]
    assert not missing, f"rows missing from the table: {missing}\n{done.stdout[-3000:]}"
    assert {status for status in checks.values()} <= {"PASS", "info", "dry"}
    assert checks[("4 torchrun", "train.py again: resume")] == "PASS"
    assert checks[("1 rerank", "electra-tiny crossrank eager / best CrossEncoder.predict")] == "dry"  # not gated
    assert done.stdout.rstrip().splitlines()[-1].endswith("(target == 0) PASS")


def test_a_failing_check_makes_the_exit_status_1():
    done = dry_run("--sections", "1", "--models", "minilm", "--min-tau", "1.01")  # tau <= 1 always
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {(r[0], r[1]): r for r in table_rows(done.stdout)}
    tau = rows[("1 rerank", "minilm crossrank eager Kendall tau bf16 vs fp32 (real weights, fitted head)")]
    assert tau[-2:] == [">= 1.01", "FAIL"]
    assert float(tau[2]) >= 0.98  # the real gate would pass: only the impossible target fails
    fit = rows[("1 rerank", "minilm head fitted to the first-stage scores (ridge, fp32)")][2]
    r2, spread, agreement = (float(part.split()[-1]) for part in (fit.split(" on ")[0], fit.split(", ")[1],
                                                                  fit.split(", ")[2]))
    assert r2 > 0.5 and agreement > 0.5  # the head ranks like the first stage it was fitted to
    assert spread > 0.1  # scores separate the passages (a random head's spread within a query: ~0.02)
    assert done.stdout.rstrip().splitlines()[-1].startswith("checks failed = 1 of ")
    assert done.stdout.rstrip().splitlines()[-1].endswith("FAIL")


def test_a_step_still_running_past_the_budget_is_stopped_and_fails(monkeypatch):
    import importlib.util
    import time

    import torch

    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    gpu = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_bench", gpu)  # dataclasses look their module up there
    spec.loader.exec_module(gpu)
    monkeypatch.setattr(gpu, "OVERRUN_S", 1)
    report = gpu.Report(dry=False)
    started = time.perf_counter()
    gpu.run_steps([("9 x slow", lambda: time.sleep(30)), ("9 x next", lambda: None)], 0.5, started,
                  torch.device("cpu"), report)
    assert time.perf_counter() - started < 10
    assert [(r.check, r.status) for r in report.rows] == [("9 x slow", "FAIL"), ("9 x next", "FAIL")]
    assert report.rows[0].value.startswith("error: TimeoutError")
    assert report.rows[1].value == "skipped: over the time budget"
