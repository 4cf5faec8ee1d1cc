"""pytest-timeout's per-test limit counted on the work clock (`work_clock.py`): a test fails when it
has had its limit's worth of uncontended time, so a busy neighbour stretches the limit (up to ten
times) and a hang is still caught at the nominal limit.

A watchdog thread reads the clock twice a second; at the limit it interrupts the test's main thread
with SIGALRM, whose handler is pytest-timeout's own (the threads' stacks, then the test fails). A
test stuck where no signal handler can run (inside C code) is ended a minute later the way
pytest-timeout's thread method ends one: stacks dumped, the process exits.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import pytest
from pytest_timeout import timeout_sigalrm, timeout_timer

from tests.kit.work_clock import MAX_STRETCH, WorkDeadline

_TICK_S = 0.5
_GRACE_S = 60.0  # after the signal, before the process is ended


def start(item: pytest.Item, settings: Any) -> bool | None:
    """Start the test's limit; None leaves it to pytest-timeout (its thread method, a worker thread)."""
    if settings.method != "signal" or threading.current_thread() is not threading.main_thread():
        return None
    deadline = WorkDeadline(settings.timeout)
    stop = threading.Event()
    main = threading.main_thread().ident
    assert main is not None

    def handler(signum: int, frame: Any) -> None:
        __tracebackhide__ = True
        sys.stderr.write(f"\n{item.nodeid}: past its limit of {deadline.describe()}\n")
        timeout_sigalrm(item, settings)

    def watch() -> None:
        while not stop.wait(_TICK_S):
            if deadline.expired() or deadline.clock.wall() > settings.timeout * MAX_STRETCH:
                signal.pthread_kill(main, signal.SIGALRM)
                if not stop.wait(_GRACE_S):
                    timeout_timer(item, settings)
                return

    watchdog = threading.Thread(target=watch, name=f"work-timeout {item.nodeid}", daemon=True)

    def cancel() -> None:
        stop.set()
        watchdog.join()
        signal.signal(signal.SIGALRM, signal.SIG_DFL)

    item.cancel_timeout = cancel  # type: ignore[attr-defined]  # what pytest-timeout's cancel hook calls
    signal.signal(signal.SIGALRM, handler)
    watchdog.start()
    return True
