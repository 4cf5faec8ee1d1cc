"""The compute dtype an engine runs in: `auto` picks the one its device computes fast.

On CPU, bf16 matmuls are fast only with bf16 instructions (AVX-512 BF16 or AMX). Without them torch
emulates bf16: on an AVX2-only EPYC its GEMMs ran at ~15 GFLOP/s against fp32's ~118, and SmolLM2 ran
about 8× slower in bf16 than in fp32 (bench/RESULTS.md). So `auto` is bf16 on CUDA and on CPUs with
those instructions, fp32 elsewhere, and an explicit bf16 on a CPU without them is logged as a warning.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

from services.common import cpu

log = logging.getLogger("openlora.engine")

Dtype = Literal["float32", "bfloat16", "float16"]
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
EMULATED_BF16_SLOWDOWN = 8  # SmolLM2 fp32 vs bf16 on the AVX2-only EPYC, 2026-12-01


def cpu_has_native_bf16() -> bool:
    return any(flag in cpu.cpu_flags() for flag in NATIVE_BF16_FLAGS)


def resolve_dtype(name: str, device: str | torch.device) -> Dtype:
    """`auto` → bfloat16 on CUDA or a CPU with bf16 instructions, else float32; any other name as is."""
    if name not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {name!r}")
    if name != "auto":
        return name  # type: ignore[return-value]
    kind = torch.device(device).type
    if kind == "cuda" or (kind == "cpu" and cpu_has_native_bf16()):
        return "bfloat16"
    return "float32"


def warn_if_slow(dtype: str, device: str | torch.device) -> None:
    """Log a warning when `dtype` is one this device only emulates."""
    if dtype == "bfloat16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        log.warning(
            "dtype bfloat16 on a CPU without bf16 instructions (%s): torch emulates it, about %d× "
            "slower than float32 on such a CPU; dtype=auto picks float32 here",
            "/".join(NATIVE_BF16_FLAGS),
            EMULATED_BF16_SLOWDOWN,
        )
