"""The CPU's feature flags, read once: what the engine's dtype choice and the benchmarks' figures
depend on. Plain Python (no torch), so tools that never load a model can ask too."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where /proc/cpuinfo is not there)."""
    try:
        line = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return frozenset()
    return frozenset(line.split(":", 1)[-1].split())
