"""Processes that must not outlive the one that started them: a worker's engine, `openlora up`'s
services. Each child asks Linux for a signal when its parent ends (the parent-death signal), so a
parent killed without a chance to stop its children (SIGKILL, a crash) leaves nothing running."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal

PARENT_PID_ENV = "OPENLORA_PARENT_PID"
"""Set by a parent in a child's environment: the child then ends (SIGTERM, so it drains) with it."""

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int, parent_pid: int | None = None) -> None:
    """Receive `sig` when the parent ends. Given the parent's pid, a parent that already ended before
    this call (the race the kernel cannot see) sends it at once."""
    with contextlib.suppress(Exception):  # not Linux: the parent stops its children itself
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig)
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), sig)


def die_with_parent_if_asked() -> None:
    """`die_with_parent(SIGTERM)` when the environment names a parent; the variable is removed, so
    processes this one starts do not inherit a parent that is not theirs."""
    value = os.environ.pop(PARENT_PID_ENV, None)
    if value and value.isdigit():
        die_with_parent(signal.SIGTERM, int(value))
