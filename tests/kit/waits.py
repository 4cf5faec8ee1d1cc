"""Waiting for a condition within a limit counted on the work clock (`work_clock.py`): a busy
neighbour stretches the wait, a condition that never comes still fails at the nominal limit."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import Any, TypeVar

from tests.kit.work_clock import WorkDeadline

T = TypeVar("T")
_POLL_S = 0.1


async def wait_until(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = WorkDeadline(timeout)
    while not predicate():
        if deadline.expired():
            raise AssertionError(f"{what} not reached within {deadline.describe()}")
        await asyncio.sleep(_POLL_S / 2)


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """`asyncio.wait_for` with its limit on the work clock: the awaitable is cancelled, and
    TimeoutError raised, once it has had `timeout` seconds of work."""
    task = asyncio.ensure_future(awaitable)
    deadline = WorkDeadline(timeout)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=min(_POLL_S, timeout))
            if done:
                return task.result()
            if deadline.expired():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise TimeoutError(f"not done within {deadline.describe()}")
    finally:
        task.cancel()  # a no-op once done; the caller's own cancellation reaches the awaitable
