"""Gateways, workers and clients for the gateway's tests.

`GatewayUnderTest` runs the gateway in the test's event loop; fake workers run in-process
(`FakeWorker`) or as processes a test kills and restarts (`FakeWorkerProcess`). Tenants: `acme` and
`globex` with a working key each, plus a revoked key of `acme`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from openlora.v1 import adapter_store_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc

from services.common.grpc_client import open_channel
from services.common.grpc_server import GrpcServer
from services.gateway.app import GatewayApp
from services.gateway.keys import hash_key
from services.gateway.settings import GatewaySettings
from tests.integration.gateway.fake_worker import FakeWorker, fake_worker_server
from tests.kit.waits import wait_until

ROOT = Path(__file__).resolve().parents[3]
ACME_KEY = "olk_acme-test-key-0123456789abcdefghijklmnopqrstuv"
GLOBEX_KEY = "olk_globex-test-key-0123456789abcdefghijklmnopqrstu"
REVOKED_KEY = "olk_acme-revoked-key-0123456789abcdefghijklmnopqrs"


def key_document(tenants: dict[str, dict[str, int]] | None = None) -> dict[str, Any]:
    return {
        "tenants": tenants or {},
        "keys": [
            {"sha256": hash_key(ACME_KEY), "tenant": "acme", "name": "ci"},
            {"sha256": hash_key(GLOBEX_KEY), "tenant": "globex", "name": "ci"},
            {"sha256": hash_key(REVOKED_KEY), "tenant": "acme", "name": "old", "revoked": True},
        ],
    }


def write_keys(path: Path, tenants: dict[str, dict[str, int]] | None = None) -> Path:
    path.write_text(json.dumps(key_document(tenants)))
    return path


def gateway_settings(tmp_path: Path, workers: Sequence[str], **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "port": 0,
        "workers": ",".join(workers),
        "store_address": None,
        # A test that wrote its own key file (tenant limits) keeps it.
        "api_keys_file": keys if (keys := tmp_path / "keys.json").exists() else write_keys(keys),
        "metrics_port": None,
        "http_port": None,
        "worker_retry_s": 0.2,
        "worker_retry_max_s": 1.0,
        "grace_period_s": 2.0,
        "log_level": "WARNING",
    }
    return GatewaySettings(**(values | overrides))


@dataclass
class GatewayUnderTest:
    gateway: GatewayApp
    port: int
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceAsyncStub
    store: adapter_store_pb2_grpc.AdapterStoreAsyncStub

    @classmethod
    async def start(cls, settings: GatewaySettings, *, wait_workers: int = 0) -> GatewayUnderTest:
        gateway = GatewayApp(settings)
        port = await gateway.start()
        channel = open_channel(f"127.0.0.1:{port}")
        started = cls(
            gateway,
            port,
            channel,
            inference_pb2_grpc.InferenceStub(channel),
            adapter_store_pb2_grpc.AdapterStoreStub(channel),
        )
        await started.wait_healthy(wait_workers)
        return started

    async def wait_healthy(self, count: int, timeout: float = 30.0) -> None:
        await wait_until(lambda: len(self.gateway.pool.healthy_loads()) == count, timeout, f"{count} healthy")

    async def stop(self) -> None:
        await self.channel.close()
        await self.gateway.stop()

    def counter(self, name: str, **labels: str) -> float:
        value = self.gateway.registry.get_sample_value(name, labels)
        return value or 0.0


def auth(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def generate_request(
    text: str = "hello there",
    *,
    adapter: str | None = None,
    mix: Sequence[str] = (),
    max_new_tokens: int = 4,
    request_id: str = "",
) -> inference_pb2.GenerateRequest:
    # ignore_eos: a real worker's random tiny model may end early; tests count exact tokens.
    sampling = common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    request = inference_pb2.GenerateRequest(text=text, request_id=request_id, sampling=sampling)
    if adapter is not None:
        request.adapter_ref.id = adapter
    for component in mix:
        request.mix.components.add(adapter=common_pb2.AdapterRef(id=component), weight=1.0)
    return request


@dataclass
class Result:
    chunks: list[inference_pb2.GenerateChunk]

    @property
    def served_by(self) -> set[str]:
        return {c.text for c in self.chunks if c.text}

    @property
    def tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)


async def generate(
    stub: inference_pb2_grpc.InferenceAsyncStub,
    request: inference_pb2.GenerateRequest,
    key: str = ACME_KEY,
    timeout: float = 30.0,
    metadata: Sequence[tuple[str, str]] = (),
) -> Result:
    chunks = [c async for c in stub.Generate(request, metadata=[*auth(key), *metadata], timeout=timeout)]
    return Result(chunks)


def retry_delay_s(exc: grpc.aio.AioRpcError) -> float | None:
    """The google.rpc.RetryInfo delay of an error, if it carries one."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.RetryInfo()
                if detail.Unpack(info):
                    delay: duration_pb2.Duration = info.retry_delay
                    return delay.ToNanoseconds() / 1e9
    return None


def bad_field(exc: grpc.aio.AioRpcError) -> str | None:
    """The field a google.rpc.BadRequest detail of the error names."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return str(bad.field_violations[0].field)
    return None


def trailer(exc: grpc.aio.AioRpcError, key: str) -> str | None:
    for name, value in exc.trailing_metadata() or ():
        if name == key:
            return str(value)
    return None


@dataclass
class InProcessWorkers:
    """Fake workers served in the test's own event loop."""

    workers: list[FakeWorker]
    servers: list[GrpcServer] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)

    @classmethod
    async def start(cls, count: int, delay_s: float = 0.0, first_delay_s: float = 0.0) -> InProcessWorkers:
        started = cls([FakeWorker(f"w{i}", delay_s, first_delay_s) for i in range(count)])
        for worker in started.workers:
            server = fake_worker_server(worker)
            port = await server.start()
            started.servers.append(server)
            started.addresses.append(f"127.0.0.1:{port}")
        return started

    def by_name(self, name: str) -> FakeWorker:
        return next(w for w in self.workers if w.name == name)

    async def stop(self) -> None:
        await asyncio.gather(*(server.stop() for server in self.servers))


@dataclass
class FakeWorkerProcess:
    """`python -m tests.integration.gateway.fake_worker` on a fixed port, to kill and restart."""

    name: str
    port: int
    log_path: Path
    delay_s: float = 0.05
    first_delay_s: float = 0.0
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> FakeWorkerProcess:
        argv = [sys.executable, "-m", "tests.integration.gateway.fake_worker", "--name", self.name]
        argv += [
            "--port",
            str(self.port),
            "--delay",
            str(self.delay_s),
            "--first-delay",
            str(self.first_delay_s),
        ]
        self.process = spawn(argv, self.log_path)
        await wait_port(self.port, self.process)
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)


def spawn(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ), stdout=log, stderr=log)


async def wait_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"nothing listening on {port} within {timeout:g}s")
