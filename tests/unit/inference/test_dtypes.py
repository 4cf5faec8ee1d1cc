"""`dtype=auto`: bfloat16 where the device computes it natively, float32 elsewhere; a slow explicit choice
is logged. The CPU's flags are stubbed: the machines running this suite have either kind of CPU."""

from __future__ import annotations

import logging

import pytest

from services.common import cpu
from services.inference.engine import dtypes
from services.inference.engine.llm_engine import EngineConfig

AVX2_ONLY = frozenset({"fpu", "sse2", "avx", "avx2", "fma"})
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}
SAPPHIRE_RAPIDS = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16", "amx_int8"}


def with_flags(monkeypatch: pytest.MonkeyPatch, flags: frozenset[str]) -> None:
    monkeypatch.setattr(cpu, "cpu_flags", lambda: flags)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (AVX2_ONLY, "float32"),
        (AVX512_BF16, "bfloat16"),
        (SAPPHIRE_RAPIDS, "bfloat16"),
        (frozenset(), "float32"),
    ],
    ids=["avx2-only", "avx512-bf16", "amx", "unknown-cpu"],
)
def test_auto_picks_bf16_only_on_a_cpu_with_bf16_instructions(
    monkeypatch: pytest.MonkeyPatch, flags: frozenset[str], expected: str
) -> None:
    with_flags(monkeypatch, flags)
    assert dtypes.resolve_dtype("auto", "cpu") == expected
    assert EngineConfig(dtype="auto").dtype == expected  # the config holds what the engine runs in


def test_auto_is_bf16_on_cuda_whatever_the_host_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    with_flags(monkeypatch, AVX2_ONLY)
    assert dtypes.resolve_dtype("auto", "cuda") == "bfloat16"
    assert dtypes.resolve_dtype("auto", "cuda:1") == "bfloat16"


def test_an_explicit_dtype_is_kept_and_an_unknown_one_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    with_flags(monkeypatch, AVX512_BF16)
    assert dtypes.resolve_dtype("float32", "cpu") == "float32"
    assert EngineConfig(dtype="float16").dtype == "float16"
    with pytest.raises(ValueError, match="dtype must be one of"):
        dtypes.resolve_dtype("float64", "cpu")


def test_explicit_bf16_on_a_cpu_without_it_warns_with_the_slowdown(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with_flags(monkeypatch, AVX2_ONLY)
    with caplog.at_level(logging.WARNING, logger="openlora.engine"):
        dtypes.warn_if_slow("bfloat16", "cpu")
    assert "8× slower than float32" in caplog.text and "avx512_bf16/amx_bf16" in caplog.text
    caplog.clear()
    with_flags(monkeypatch, AVX512_BF16)
    with caplog.at_level(logging.WARNING, logger="openlora.engine"):
        dtypes.warn_if_slow("bfloat16", "cpu")
        dtypes.warn_if_slow("float32", "cpu")
    with_flags(monkeypatch, AVX2_ONLY)
    with caplog.at_level(logging.WARNING, logger="openlora.engine"):
        dtypes.warn_if_slow("bfloat16", "cuda")
    assert caplog.text == ""


def test_this_machine_reads_its_own_flags() -> None:
    """/proc/cpuinfo parses to flags on Linux (the stubbed tests above trust that shape)."""
    flags = cpu.cpu_flags()
    assert not flags or {"sse2", "fpu"} & flags
