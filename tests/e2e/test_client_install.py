"""The client as a backend team installs it: a fresh venv with only `pip install ./clients/python` (no
torch, no server stack) runs the README's client example against `openlora demo --serve`; the README's
`curl` line and `openai` SDK example run against the same cluster's HTTP API."""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import venv
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]
OPENLORA = Path(sys.executable).with_name("openlora")
EXPORT = re.compile(r"export OPENLORA_TARGET=(\S+) OPENLORA_API_KEY=(\S+)")
OPENAI_EXPORT = re.compile(r"export OPENAI_BASE_URL=(\S+) OPENAI_API_KEY=(\S+)")


def readme_block(marker: str, language: str = "python") -> str:
    """The code block after one of the README's `<!-- marker ... -->` lines, exactly as a reader copies it."""
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker}[^>]*-->\s*```{language}\n(.*?)```", text, re.S)
    assert found, f"README.md lost its marked {marker} block"
    return found.group(1)


def client_only_venv(where: Path) -> Path:
    venv.EnvBuilder(with_pip=True).create(where)
    python = where / "bin" / "python"
    # A copy, so pip's in-tree build leaves the checkout as it was (and parallel runs apart).
    source = shutil.copytree(
        ROOT / "clients" / "python",
        where.parent / "client-source",
        ignore=shutil.ignore_patterns("build", "*.egg-info"),
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", str(source)],
        check=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    return python


def lines_of(process: subprocess.Popen[str]) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_for_exports(lines: queue.Queue[str], timeout_s: float) -> tuple[dict[str, str], str]:
    """The environment the demo's `export` lines set (gRPC and OpenAI), and its output so far."""
    seen = ""
    env: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        seen += line
        if found := EXPORT.search(line):
            env |= {"OPENLORA_TARGET": found.group(1), "OPENLORA_API_KEY": found.group(2)}
        if found := OPENAI_EXPORT.search(line):
            env |= {"OPENAI_BASE_URL": found.group(1), "OPENAI_API_KEY": found.group(2)}
        if len(env) == 4:
            return env, seen
    raise AssertionError("the demo never said where to connect:\n" + seen[-4000:])


def test_the_readme_client_example_runs_from_a_client_only_venv(tmp_path: Path) -> None:
    python = client_only_venv(tmp_path / "venv")
    isolated = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}  # nothing of the repository's env
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, openlora; print(u.find_spec('torch'), openlora.__file__)",
        ],
        capture_output=True,
        text=True,
        env=isolated,
        cwd=tmp_path,
        timeout=60,
    )
    assert probe.returncode == 0, probe.stderr
    no_torch, module_file = probe.stdout.split()
    assert no_torch == "None", "the client pulled torch in"
    assert module_file.startswith(str(tmp_path / "venv")), module_file

    demo = subprocess.Popen(
        [str(OPENLORA), "demo", "--model", "tiny", "--serve", "--keep", str(tmp_path / "cluster")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        exports, log = wait_for_exports(lines_of(demo), timeout_s=420)
        example = tmp_path / "example.py"
        example.write_text(readme_block("client-example"))
        grpc_env = {k: v for k, v in exports.items() if k.startswith("OPENLORA_")}
        run = subprocess.run(
            [str(python), str(example)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            env={**isolated, **grpc_env},
        )
        assert run.returncode == 0, run.stdout + run.stderr + log[-3000:]
        assert "demo/poet" in run.stdout  # the example lists the adapters it may use
        assert re.search(r"\b\d+ completion tokens", run.stdout), run.stdout

        http_env = {**isolated, **{k: v for k, v in exports.items() if k.startswith("OPENAI_")}}
        curl = subprocess.run(
            ["bash", "-c", readme_block("curl-example", "bash")],
            capture_output=True,
            text=True,
            timeout=120,
            env=http_env,
        )
        assert curl.returncode == 0 and curl.stdout.rstrip().endswith("data: [DONE]"), (
            curl.stdout + curl.stderr
        )
        sdk_example = tmp_path / "openai_example.py"
        sdk_example.write_text(readme_block("openai-example"))
        # The repository's environment has the openai SDK (a dev dependency); the client venv need not.
        sdk = subprocess.run(
            [sys.executable, str(sdk_example)],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
            env=http_env,
        )
        assert sdk.returncode == 0, sdk.stdout + sdk.stderr + log[-3000:]
        assert "demo/chef" in sdk.stdout and "completion_tokens=" in sdk.stdout, sdk.stdout
    finally:
        demo.send_signal(signal.SIGINT)
        try:
            code = demo.wait(timeout=120)
        except subprocess.TimeoutExpired:
            demo.kill()
            raise
    assert code == 0
