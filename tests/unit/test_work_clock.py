"""The suite's time limits count uncontended time: the clock's arithmetic on a scripted stall counter,
and a real pytest run whose hanging test is still failed at its nominal limit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.kit import work_clock
from tests.kit.work_clock import WorkClock, WorkDeadline

ROOT = Path(__file__).resolve().parents[2]


class Machine:
    """A scripted monotonic clock and stall counter."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, reports_pressure: bool = True) -> None:
        self.now = 1000.0
        self.stalled = 5_000_000
        monkeypatch.setattr(time, "monotonic", lambda: self.now)
        monkeypatch.setattr(work_clock, "stalled_us", lambda: self.stalled if reports_pressure else None)

    def run(self, seconds: float, contended: float) -> None:
        self.now += seconds
        self.stalled += int(seconds * contended * 1e6)


def test_quiet_time_counts_in_full(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Machine(monkeypatch)
    clock = WorkClock()
    machine.run(10, contended=0.0)
    assert clock.elapsed() == pytest.approx(10)


def test_contended_time_does_not_count_however_often_the_clock_is_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    machine = Machine(monkeypatch)
    once, often = WorkClock(), WorkClock()
    for _ in range(20):
        machine.run(0.5, contended=0.75)
        often.elapsed()
    assert once.elapsed() == pytest.approx(2.5) and often.elapsed() == pytest.approx(2.5)


def test_the_clock_never_runs_slower_than_a_tenth_of_wall_time(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Machine(monkeypatch)
    deadline = WorkDeadline(5)
    machine.run(49, contended=1.0)
    assert not deadline.expired()
    machine.run(2, contended=1.0)
    assert deadline.expired()
    assert "5s of work (5.1s uncontended in 51.0s)" in deadline.describe()


def test_without_pressure_reports_it_is_the_wall_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    machine = Machine(monkeypatch, reports_pressure=False)
    clock = WorkClock()
    machine.run(3, contended=1.0)
    assert clock.elapsed() == pytest.approx(3)


def test_a_hanging_test_fails_at_its_limit_and_a_quick_one_passes(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(
        textwrap.dedent(
            """
            import pytest
            from tests.kit import work_timeout

            @pytest.hookimpl(tryfirst=True)
            def pytest_timeout_set_timer(item, settings):
                return work_timeout.start(item, settings)
            """
        )
    )
    (tmp_path / "test_limits.py").write_text(
        textwrap.dedent(
            """
            import threading, time

            def test_hangs():
                threading.Event().wait(60)  # waits for nothing runnable: no contention to excuse it

            def test_quick():
                time.sleep(0.1)
            """
        )
    )
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=2", str(tmp_path)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - started
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 failed, 1 passed" in run.stdout, run.stdout
    assert "test_hangs: past its limit of 2s of work" in run.stdout + run.stderr
    assert took < 60, "the hang was ended by the limit, not by the wait"
