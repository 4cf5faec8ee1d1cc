"""What a benchmark figure depends on besides our code: the CPU's vector extensions and a busy host."""

from __future__ import annotations

from pathlib import Path

import psutil


def cpu_flags() -> str:
    """The vector extensions of this CPU that matter to torch's kernels (figures depend on them)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return ""
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile", "fma")
    return " ".join(f for f in wanted if f in flags)


def steal_seconds() -> float:
    """CPU time the hypervisor gave other machines while ours wanted it (0 on bare metal): a run
    with much of it measured a busy host, not our code."""
    return float(getattr(psutil.cpu_times(), "steal", 0.0))
