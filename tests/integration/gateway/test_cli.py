"""`openlora gateway serve` as a process: serves, exposes /metrics, drains on SIGTERM; bad keys stop it."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

from openlora.v1 import inference_pb2_grpc

from services.common.grpc_client import health_status, open_channel
from tests.integration.gateway.kit import (
    GLOBEX_KEY,
    InProcessWorkers,
    generate,
    generate_request,
    spawn,
    write_keys,
)
from tests.kit.ports import free_ports
from tests.kit.waits import wait_until

OPENLORA = str(Path(sys.executable).parent / "openlora")


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


async def test_serve_generate_scrape_and_stop(tmp_path: Path) -> None:
    workers = await InProcessWorkers.start(2)
    port, metrics_port = free_ports(2)
    argv = [OPENLORA, "gateway", "serve", "--port", str(port), "--http-port", "0"]
    argv += ["--workers", ",".join(workers.addresses)]
    argv += ["--store-address", "", "--metrics-port", str(metrics_port)]
    argv += ["--api-keys-file", str(write_keys(tmp_path / "keys.json"))]
    process = spawn(argv, tmp_path / "gateway.log")
    try:
        async with open_channel(f"127.0.0.1:{port}") as channel:
            serving: list[str] = []

            async def check() -> None:
                try:
                    serving.append(await health_status(channel, timeout=1))
                except Exception:  # not listening yet
                    serving.append("down")

            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not serving or serving[-1] != "SERVING":
                assert process.poll() is None, (tmp_path / "gateway.log").read_text()
                assert loop.time() < deadline, "the gateway did not become SERVING"
                await check()
                await asyncio.sleep(0.1)
            result = await generate(
                inference_pb2_grpc.InferenceStub(channel), generate_request(), key=GLOBEX_KEY
            )
            assert result.tokens == 4
        metrics = await asyncio.to_thread(scrape, metrics_port)
        assert 'openlora_gateway_requests_total{code="OK",method="Generate",tenant="globex"} 1.0' in metrics
        assert 'openlora_gateway_routing_decisions_total{decision="least_loaded"} 1.0' in metrics
        assert metrics.count("openlora_gateway_worker_healthy{") == 2

        process.send_signal(signal.SIGTERM)
        await wait_until(lambda: process.poll() is not None, 30, "the gateway to exit")
        assert process.returncode == 0, (tmp_path / "gateway.log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
        await workers.stop()


def test_a_malformed_key_file_is_a_readable_start_up_error(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": [{"sha256": "the-key-itself", "tenant": "acme"}]}')
    result = subprocess.run(
        [
            OPENLORA,
            "gateway",
            "serve",
            "--port",
            "0",
            "--api-keys-file",
            str(keys),
            "--metrics-port",
            "0",
            "--http-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "sha256 must be 64 hex digits" in result.stderr and "Traceback" not in result.stderr
