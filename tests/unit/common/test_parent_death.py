"""A service started by `openlora up` (or an engine by its worker) ends when its parent does, even
when the parent is SIGKILLed and cannot stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[3]
CHILD = (
    "import time\n"
    "from services.common.parent_death import die_with_parent_if_asked\n"
    "die_with_parent_if_asked()\n"
    "print('armed', flush=True)\n"
    "time.sleep(120)\n"
)
PARENT = (
    "import os, subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.PIPE,\n"
    "                         env={**os.environ, 'OPENLORA_PARENT_PID': str(os.getpid())})\n"
    "print(child.pid, flush=True)\n"
    "child.stdout.readline()\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)  # ended, not yet reaped
    except psutil.NoSuchProcess:
        return True


def test_a_child_ends_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE, cwd=ROOT)
    assert parent.stdout is not None
    child_pid = int(parent.stdout.readline())
    try:
        assert parent.stdout.readline().strip() == b"ready"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 30
        while not _gone(child_pid):
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.05)
    finally:
        parent.kill()
        if not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_ends_at_once() -> None:
    # The named parent is not this process's parent: it ended before the child could ask the kernel.
    env = {**os.environ, "OPENLORA_PARENT_PID": str(os.getpid() + 10**6)}
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, timeout=60)
    assert child.returncode == -signal.SIGTERM
    assert b"armed" not in child.stdout
