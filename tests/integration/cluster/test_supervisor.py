"""The supervisor of `openlora up` with real child processes (scripted gRPC servers)."""

from __future__ import annotations

import io
import signal
import sys

import pytest

from services.cluster.supervisor import ChildFailed, ChildSpec, Supervisor
from tests.kit.ports import free_port


def scripted(name: str, port: int) -> ChildSpec:
    argv = [sys.executable, "-m", "tests.kit.scripted_inference", "--port", str(port), "--grace", "2"]
    return ChildSpec(name, argv, port, ready_timeout_s=60)


async def test_children_start_ready_stream_prefixed_logs_and_stop_in_order() -> None:
    out = io.StringIO()
    supervisor = Supervisor(out, stop_timeout_s=10)
    first, second = free_port(), free_port()
    await supervisor.start(scripted("store", first))
    await supervisor.start(scripted("worker-0", second))
    assert [c.spec.name for c in supervisor.children] == ["store", "worker-0"]
    # A child dying is noticed at once: the cluster is incomplete.
    supervisor.children[1].process.send_signal(signal.SIGKILL)
    died = await supervisor.wait_for_exit()
    assert died.spec.name == "worker-0"
    await supervisor.stop()
    assert supervisor.children[0].process.returncode == 0  # SIGTERM: drained and exited cleanly
    lines = out.getvalue().splitlines()
    assert any(line.startswith("       store | PORT ") for line in lines)
    assert any(line.startswith("    worker-0 | ") for line in lines)


async def test_a_child_that_exits_while_starting_is_reported() -> None:
    supervisor = Supervisor(io.StringIO())
    crash = ChildSpec(
        "broken", [sys.executable, "-c", "print('bad config'); raise SystemExit(3)"], free_port()
    )
    with pytest.raises(ChildFailed, match="broken exited with status 3"):
        await supervisor.start(crash)
    await supervisor.stop()


async def test_a_child_that_never_gets_ready_times_out() -> None:
    supervisor = Supervisor(io.StringIO(), stop_timeout_s=5)
    idle = ChildSpec(
        "idle", [sys.executable, "-c", "import time; time.sleep(60)"], free_port(), ready_timeout_s=1
    )
    with pytest.raises(ChildFailed, match="idle was not ready after 1 s"):
        await supervisor.start(idle)
    await supervisor.stop()
    assert supervisor.children[0].process.returncode is not None
