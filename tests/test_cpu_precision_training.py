"""train.cpu_precision: bf16 autocast for training on a CPU (opt-in; auto follows the CPU's native bf16 flags)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import write_tiny_collection
from crossrank.training import loop as training
from crossrank.config import ROOT, load_run_config
from crossrank.errors import CrossrankError


def config(model, data, out, *overrides):
    return load_run_config([ROOT / "configs" / "objectives" / "KD.yaml"], [
        f"model.path={model}", "model.name=tiny", f"data.train={data}", f"train.output_dir={out}",
        "data.num_negatives=7", "data.depth=8", "optim.lr=3e-3", "train.queries_per_batch=2", "train.accumulation=1",
        "train.log_every=1", "train.max_steps=2", *overrides])


def test_auto_follows_the_cpus_native_bf16(monkeypatch):
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16"}))
    assert training.cpu_training_precision("auto") == "bf16"
    monkeypatch.setattr(training, "cpu_flags", lambda: frozenset({"avx2"}))
    assert training.cpu_training_precision("auto") == "fp32"
    assert training.cpu_training_precision("bf16") == "bf16"  # explicit wins, native or not


def test_unknown_value_is_refused():
    with pytest.raises(CrossrankError, match="train.cpu_precision is invalid"):
        load_run_config([], ["train.cpu_precision=fp16"])


def test_bf16_trains_and_differs_from_fp32(tiny_bert, tmp_path):
    torch.set_num_threads(1)
    data = write_tiny_collection(tmp_path / "collection", valid_is_train=True)["KD"]
    first = {}
    for precision in ("fp32", "bf16"):
        state = training.train(config(tiny_bert, data, tmp_path / precision, f"train.cpu_precision={precision}"))
        rows = [json.loads(line) for line in (tmp_path / precision / "metrics.jsonl").open() if '"loss"' in line]
        assert state.finished and all(math.isfinite(r["loss"]) for r in rows)
        first[precision] = rows[0]["loss"]
    # the same examples and weights: bf16 rounding moves the loss a little, and only a little
    assert first["bf16"] != first["fp32"] and math.isclose(first["bf16"], first["fp32"], rel_tol=0.05)
