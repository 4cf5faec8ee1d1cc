"""A client written with another gRPC implementation (Node's @grpc/grpc-js) streams through the gateway.

The Node packages are pinned in `node_client/package-lock.json` and installed with `npm ci` into the
git-ignored `node_client/node_modules` the first time; the test is skipped, saying why, only when
node or npm is missing or the registry cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.gateway.kit import ACME_KEY, GatewayUnderTest, InProcessWorkers, gateway_settings
from tests.kit.waits import within

CLIENT_DIR = Path(__file__).parent / "node_client"
NPM_TIMEOUT_S = 180


async def run(*argv: str, cwd: Path, timeout: float) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await within(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        return -1, f"timed out after {timeout:g}s"
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.fixture
async def node_client() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are needed for the grpc-js client test")
    if not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        code, output = await run(
            npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", cwd=CLIENT_DIR, timeout=NPM_TIMEOUT_S
        )
        if code != 0:
            if any(s in output for s in ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "timed out")):
                pytest.skip(f"npm registry unreachable, grpc-js not installed: {output.strip()[-300:]}")
            raise AssertionError(f"npm ci failed:\n{output}")
    return CLIENT_DIR / "client.js"


@pytest.fixture
async def gateway(tmp_path: Path) -> AsyncIterator[GatewayUnderTest]:
    workers = await InProcessWorkers.start(2, delay_s=0.01)
    started = await GatewayUnderTest.start(gateway_settings(tmp_path, workers.addresses), wait_workers=2)
    yield started
    await started.stop()
    await workers.stop()


def lines(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


async def test_a_grpc_js_client_streams_a_generation(node_client: Path, gateway: GatewayUnderTest) -> None:
    node = shutil.which("node")
    assert node is not None
    target = f"127.0.0.1:{gateway.port}"
    code, output = await run(
        node,
        str(node_client),
        target,
        ACME_KEY,
        "hello from node",
        "some-adapter",
        cwd=CLIENT_DIR,
        timeout=60,
    )
    assert code == 0, output
    messages = lines(output)
    chunks, done = messages[:-1], messages[-1]
    assert done == {"done": True, "chunks": 6, "tokens": 5}
    assert [c["finish_reason"] for c in chunks] == ["FINISH_REASON_UNSPECIFIED"] * 5 + ["LENGTH"]
    assert len({c["text"] for c in chunks[:5]}) == 1  # one worker served the whole stream

    code, output = await run(node, str(node_client), target, "", "no key", cwd=CLIENT_DIR, timeout=60)
    assert code == 1
    assert lines(output)[-1]["code"] == 16, output  # UNAUTHENTICATED, as grpc-js reports it
