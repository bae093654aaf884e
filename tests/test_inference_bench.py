"""bench/inference.py's optional backends (issue 24, item 9): one that cannot run here is skipped with one line
naming it and why, and the bench goes on (it used to stop with torch's "Module onnx is not installed")."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "inference.py"
INSTALL = "(pip install -r requirements-bench.txt)"


@pytest.fixture
def bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("inference_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "inference_bench", module)
    spec.loader.exec_module(module)
    return module


def installed(monkeypatch, bench, present: set[str]) -> None:
    """Pretend that of the optional modules only `present` are installed."""
    real = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: (real("json") if name in present else None)
                        if name in ("onnx", "onnxruntime", "openvino") else real(name, *a))


def no_export(folder):
    raise AssertionError("nothing needs the ONNX export")


@pytest.mark.parametrize("present, lines", [
    (set(), [f"skipped ST onnx (ORT): module onnx, onnxruntime not installed {INSTALL}",
             f"skipped ST openvino: module onnx, openvino not installed {INSTALL}"]),
    ({"onnx"}, [f"skipped ST onnx (ORT): module onnxruntime not installed {INSTALL}",
                f"skipped ST openvino: module openvino not installed {INSTALL}"]),
    ({"onnxruntime", "openvino"}, [f"skipped ST onnx (ORT): module onnx not installed {INSTALL}",
                                   f"skipped ST openvino: module onnx not installed {INSTALL}"]),
])
def test_a_missing_backend_is_skipped_with_one_named_line(bench, monkeypatch, capsys, present, lines):
    installed(monkeypatch, bench, present)
    monkeypatch.setattr(bench, "onnx_export", no_export)
    assert bench.onnx_peers("unused", [("q", "p")]) == {}
    assert capsys.readouterr().out.splitlines() == lines


def test_a_failed_export_skips_the_backends_that_need_it(bench, monkeypatch, capsys):
    import torch

    installed(monkeypatch, bench, {"onnx", "onnxruntime"})

    def export(folder):
        raise torch.onnx.OnnxExporterError("Module onnx is not installed!")  # what torch says without onnx

    monkeypatch.setattr(bench, "onnx_export", export)
    assert bench.onnx_peers("unused", [("q", "p")]) == {}
    assert capsys.readouterr().out.splitlines() == [
        f"skipped ST openvino: module openvino not installed {INSTALL}",
        "skipped ST onnx (ORT): the ONNX export failed (OnnxExporterError: Module onnx is not installed!)"]


def test_without_onnx_here_the_real_modules_say_so(bench, capsys):
    if importlib.util.find_spec("onnx") is not None:
        pytest.skip("onnx is installed here")
    assert bench.onnx_peers("unused", [("q", "p")]) == {}
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and all(line.startswith("skipped ST ") and "onnx" in line for line in out)
