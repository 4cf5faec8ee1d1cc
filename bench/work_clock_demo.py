"""What a test time limit decides beside busy neighbours: pytest-timeout's wall clock against the
suite's work clock (`tests/kit/work_clock.py`).

A CPU-bound test whose quiet run takes T seconds (the test alone, not pytest's start) gets a limit of
1.5 T; it runs once alone, then beside
`--neighbours` busy processes under each clock; then a test that hangs runs beside them under the
work clock. Prints one JSON line.

    .venv/bin/python bench/work_clock_demo.py --neighbours 2
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORK_TEST = """
import time
import torch

def test_work():
    started = time.perf_counter()
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    for _ in range({iterations}):
        a = torch.tanh(a @ a)
    with open("took.txt", "w") as took:
        took.write(str(time.perf_counter() - started))
"""
HANG_TEST = """
import threading

def test_hang():
    threading.Event().wait(600)
"""
WORK_CLOCK_CONFTEST = """
import pytest
from tests.kit import work_timeout

@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item, settings):
    return work_timeout.start(item, settings)
"""


def run_pytest(folder: Path, timeout_s: float) -> dict[str, object]:
    (folder / "took.txt").unlink(missing_ok=True)
    started = time.monotonic()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--timeout={timeout_s}",
            str(folder),
        ],
        cwd=folder,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    took = folder / "took.txt"
    return {
        "passed": run.returncode == 0,
        "test_s": round(float(took.read_text()), 1) if took.exists() else None,
        "wall_s": round(time.monotonic() - started, 1),
    }


def suite(root: Path, name: str, test: str, conftest: str | None) -> Path:
    folder = root / name
    folder.mkdir()
    (folder / "test_it.py").write_text(textwrap.dedent(test))
    if conftest is not None:
        (folder / "conftest.py").write_text(textwrap.dedent(conftest))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--neighbours", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=6000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="work-clock-demo-"))
    work = WORK_TEST.format(iterations=args.iterations)
    wall_suite = suite(root, "wall", work, None)
    work_suite = suite(root, "work", work, WORK_CLOCK_CONFTEST)
    hang_suite = suite(root, "hang", HANG_TEST, WORK_CLOCK_CONFTEST)

    quiet = run_pytest(wall_suite, 600)
    limit = math.ceil(1.5 * float(quiet["test_s"]))  # type: ignore[arg-type]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.neighbours)]
    try:
        time.sleep(2)
        result = {
            "neighbours": args.neighbours,
            "quiet": quiet,
            "limit_s": limit,
            "wall_clock_busy": run_pytest(wall_suite, limit),
            "work_clock_busy": run_pytest(work_suite, limit),
            "hang_work_clock_busy": run_pytest(hang_suite, limit),
        }
    finally:
        for process in busy:
            process.kill()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
