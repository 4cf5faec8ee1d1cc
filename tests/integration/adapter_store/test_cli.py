"""`openlora store serve` as a real process, driven by the `openlora adapters` commands."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.cli import app
from tests.kit.ports import free_port

runner = CliRunner()


@pytest.fixture
def store_address(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = os.environ | {"OPENLORA_STORE_LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "store",
            "serve",
            "--port",
            str(port),
            "--local-dir",
            str(tmp_path / "s"),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while runner.invoke(app, ["adapters", "list", "--store", address]).exit_code != 0:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"store did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.3)
    yield address
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


@pytest.mark.slow
def test_cli_round_trip(store_address: str, tiny_llama_dir: Path, peft_adapter: Path, tmp_path: Path) -> None:
    def run(*args: str) -> str:
        result = runner.invoke(app, [*args, "--store", store_address], terminal_width=200)
        assert result.exit_code == 0, result.output
        return result.output

    assert "llama, 2 layers" in run("adapters", "register-base", "tiny", str(tiny_llama_dir))
    shown = run(
        "adapters",
        "upload",
        str(peft_adapter),
        "--id",
        "acme/poet",
        "--base-model",
        "tiny",
        "--public",
        "--trainer",
        "alice",
        "--contributor",
        "alice:trainer:0.6",
        "--contributor",
        "corpus:data:0.4",
    )
    assert "acme/poet" in shown and "alice (trainer, 0.6)" in shown
    assert "acme/poet" in run("adapters", "list")
    run("adapters", "download", "acme/poet", str(tmp_path / "dl"))
    assert (tmp_path / "dl" / "adapter_model.safetensors").is_file()
    assert "deleted 1 version" in run("adapters", "delete", "acme/poet", "--yes")

    missing = runner.invoke(app, ["adapters", "show", "acme/poet", "--store", store_address])
    assert missing.exit_code == 1 and "NOT_FOUND" in missing.output
    bad = runner.invoke(
        app,
        [
            "adapters",
            "upload",
            str(peft_adapter),
            "--id",
            "../x",
            "--base-model",
            "tiny",
            "--store",
            store_address,
        ],
        terminal_width=200,
    )
    assert bad.exit_code == 1 and "INVALID_ARGUMENT" in bad.output and "[a-z0-9][a-z0-9._-]" in bad.output
