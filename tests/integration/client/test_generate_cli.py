"""`openlora generate` against a real server process (the scripted `Inference` service)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
OPENLORA = Path(sys.executable).with_name("openlora")


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.kit.scripted_inference"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    assert line.startswith("PORT "), line
    yield f"127.0.0.1:{line.split()[1]}"
    server.terminate()
    server.wait(timeout=15)


def openlora(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(OPENLORA), *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def test_generate_streams_the_text_and_reports_usage(target: str) -> None:
    done = openlora("generate", "three word prompt", "--max-new-tokens", "3", "--target", target)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "t0 t1 t2 \n"
    assert "[length: 3 prompt + 3 completion tokens]" in done.stderr
    whole = openlora("generate", "hi", "--no-stream", "--max-new-tokens", "2", "--target", target)
    assert whole.stdout == "t0 t1 \n" and whole.returncode == 0


def test_generate_reports_server_and_usage_errors_clearly(target: str) -> None:
    refused = openlora("generate", "", "--target", target)
    assert (
        refused.returncode == 1
        and "INVALID_ARGUMENT" in refused.stderr
        and "text: must not be empty" in refused.stderr
    )
    bad_mix = openlora("generate", "hi", "--mix", "poet", "--target", target)
    assert bad_mix.returncode == 2 and "ID:WEIGHT" in bad_mix.stderr
    both = openlora("generate", "hi", "--adapter", "a", "--mix", "b:1", "--target", target)
    assert both.returncode == 2 and "not both" in both.stderr
