"""Time limits that measure the work, not a neighbour: a clock that slows down while the CPUs are
contended.

CI shares a 2-core machine: a compile or another suite beside it made tests run up to 30 times
slower, and a wall-clock limit then fails a test that was only waiting for a CPU. This clock
advances by the wall time during which no task waited for a CPU (Linux's pressure stall
information, `/proc/pressure/cpu`, "some"), so time lost to contention does not count against a
limit, while a hang, which waits for nothing runnable, is caught at its nominal limit. The clock
never runs slower than a tenth of wall time (`MAX_STRETCH`): a limit is at most ten times its
nominal wall time, however busy the machine. Where the kernel does not report pressure the clock
is the wall clock.
"""

from __future__ import annotations

import time
from pathlib import Path

MAX_STRETCH = 10.0
_PRESSURE = Path("/proc/pressure/cpu")


def stalled_us() -> int | None:
    """Microseconds, since boot, during which some task waited for a CPU; None where not reported."""
    try:
        with _PRESSURE.open() as pressure:
            return int(pressure.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


class WorkClock:
    """Seconds of uncontended time since it was made (read it as often as you like: the stall
    counter is cumulative, so the reading does not depend on how often it is taken)."""

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._stalled = stalled_us()
        self._elapsed = 0.0
        self.started = self._wall

    def elapsed(self) -> float:
        now, stalled = time.monotonic(), stalled_us()
        wall = now - self._wall
        if stalled is None or self._stalled is None:
            work = wall
        else:
            contended = min(wall, (stalled - self._stalled) / 1e6)
            work = max(wall - contended, wall / MAX_STRETCH)
        self._elapsed += work
        self._wall, self._stalled = now, stalled
        return self._elapsed

    def wall(self) -> float:
        return time.monotonic() - self.started


class WorkDeadline:
    """A limit of `seconds` on the work clock."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.clock = WorkClock()

    def expired(self) -> bool:
        return self.clock.elapsed() > self.seconds

    def describe(self) -> str:
        """How the limit was spent, for a failure message."""
        return (
            f"{self.seconds:g}s of work ({self.clock.elapsed():.1f}s uncontended in {self.clock.wall():.1f}s)"
        )
