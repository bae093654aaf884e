"""Which numeric precision re-ranking runs in, from what the processor does natively.

`eval.precision` is auto | fp32 | bf16 | fp16 | int8. `auto` resolves once, here, to a concrete precision, and only
the resolved name keys the score cache and the resume parts, so a run never mixes scores of two precisions.

On CUDA, auto is bf16 (autocast). On a CPU the choice depends on its instruction set (`/proc/cpuinfo` flags):
- `amx_bf16` (Intel Sapphire Rapids and later) or `avx512_bf16` (Cooper Lake, Zen 4/5): bf16 autocast, which
  agrees with fp32 rankings (per-query Kendall tau 0.996 on DL19 text, `bench/inference.py`) at 2.5x its speed;
- otherwise (AVX2-only CPUs such as issue 16's EPYC, ARM): fp32, since bf16 there is emulated in software and
  several times slower than fp32 (issue 16 measured 0.19x).
int8 (dynamic quantisation of the Linear layers, fast wherever fbgemm has VNNI or AVX2 kernels) is never picked
by auto: on a briefly fine-tuned MiniLM its rankings agreed with fp32 at tau 0.87 only, below the 0.98 we call
exact enough; choose it explicitly (eval.precision=int8) where speed matters more. The Set-Encoder stays fp32
under auto on a CPU (its lower-precision rankings are not measured).

An explicit choice that this CPU cannot run natively is kept but reported (`slow_precision_note`), and int8 on a
GPU is an error (dynamically quantised Linear layers run on the CPU only).
"""
from __future__ import annotations

import functools
import platform
from collections.abc import Iterable

from crossrank.errors import CrossrankError

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
FP16_FLAGS = frozenset({"amx_fp16", "avx512_fp16"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
INT8_FLAGS = VNNI_FLAGS | {"avx2"}  # fbgemm has int8 kernels for AVX2 and up (and qnnpack on ARM NEON)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The flags of the first processor in /proc/cpuinfo (Linux x86); elsewhere what torch's dispatcher says it
    uses (AVX512 / AVX2 / DEFAULT), which cannot tell bf16 or VNNI apart."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86: flags; ARM: Features
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # e.g. "AVX512", "AVX2", "DEFAULT"
    return frozenset({"avx512f", "avx2"} if capability.startswith("AVX512") else
                     {"avx2"} if capability == "AVX2" else set())


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def relevant_flags(flags: Iterable[str]) -> list[str]:
    """The flags that decide precision, for reports (the bench prints them with the CPU model)."""
    return sorted(set(flags) & (BF16_FLAGS | FP16_FLAGS | INT8_FLAGS | {"avx512f", "amx_tile", "neon", "asimd"}))


def cpu_auto_precision(flags: Iterable[str]) -> str:
    """The fastest precision of a CPU with these flags whose rankings stay close to fp32's (see module doc)."""
    return "bf16" if set(flags) & BF16_FLAGS else "fp32"


def resolve_precision(requested: str, device_type: str, flags: Iterable[str] = (), listwise: bool = False) -> str:
    """`eval.precision` made concrete for `device_type` ("cpu", "cuda", ...): never "auto". Pure: `flags` are
    the CPU's (`cpu_flags()`), passed in so that tests can fake a processor. A listwise model (`model.listwise`,
    the Set-Encoder) stays fp32 under auto on a CPU: its rankings at lower precision are not measured."""
    if requested not in PRECISIONS:
        raise CrossrankError(f"config: eval.precision is invalid (expected {', '.join(PRECISIONS)}, "
                             f"got {requested!r})")
    if device_type != "cpu":
        if requested == "int8":
            raise CrossrankError(f"config: eval.precision=int8 runs on the CPU only (expected auto, bf16, fp16 "
                                 f"or fp32 on {device_type}, got int8)")
        return "bf16" if requested == "auto" else requested
    if requested != "auto":
        return requested
    return "fp32" if listwise else cpu_auto_precision(flags)


def slow_precision_note(precision: str, device_type: str, flags: Iterable[str], model: str = "") -> str | None:
    """One line when `precision` (resolved) has no native support on this CPU, else None."""
    if device_type != "cpu":
        return None
    flags = set(flags)
    needs = {"bf16": BF16_FLAGS, "fp16": FP16_FLAGS, "int8": INT8_FLAGS | {"asimd", "neon"}}.get(precision)
    if needs is None or flags & needs:
        return None
    return (f"warning: eval.precision={precision} on this CPU ({model or 'unknown model'}) has no native support "
            f"(none of the flags {', '.join(sorted(needs))}): it is emulated and can be several times slower "
            f"than fp32 (expected eval.precision=auto or fp32 here)")


def autocast_dtype(precision: str):
    """torch.autocast's dtype for a resolved precision; None for fp32 and int8 (no autocast)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
