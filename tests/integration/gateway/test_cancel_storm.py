"""Calls cancelled as soon as they start, through the gateway, never take a real worker down.

Two `openlora worker serve` processes on the tiny model (no store, no attribution: usage waits in
their spools) behind an in-process gateway. Cancels land at every point of a request's start on the
worker, before and while its step thread takes the request in, and after the first chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from openlora.v1 import inference_pb2_grpc

from services.common.grpc_client import health_status, open_channel
from services.common.trust.roles import GATEWAY
from tests.integration.gateway.kit import (
    ACME_KEY,
    GatewayUnderTest,
    auth,
    gateway_settings,
    generate,
    generate_request,
)
from tests.integration.worker import kit as worker_kit
from tests.integration.worker.processes import ServiceProcess, worker_process
from tests.kit.ports import free_port
from tests.kit.service_auth import as_role
from tests.kit.waits import wait_until, within

pytestmark = pytest.mark.slow


@dataclass
class Worker:
    process: ServiceProcess
    metrics_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.process.port}"

    def requests_held(self) -> float:
        """Requests the engine still holds (waiting or running) plus KV blocks still in use."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        names = ("openlora_queue_depth", "openlora_running_requests", "openlora_kv_blocks_used")
        return sum(float(m[1]) for m in re.finditer(rf"^(?:{'|'.join(names)}) (\S+)$", text, re.M))


@pytest.fixture
async def workers(tmp_path: Path, tiny_llama_dir: Path) -> AsyncIterator[list[Worker]]:
    started = []
    for i in range(2):
        folder = tmp_path / f"w{i}"
        folder.mkdir()
        metrics_port = free_port()
        process = worker_process(
            folder,
            tiny_llama_dir,
            store_port=free_port(),  # unused: no LoRA slots, so no adapter cache
            attribution_port=free_port(),
            metrics_port=metrics_port,
            extra_env={
                "OPENLORA_WORKER_WORKER_ID": f"w{i}",
                "OPENLORA_WORKER_LORA_SLOTS": "0",
                "OPENLORA_WORKER_GRACE_PERIOD_S": "1",
                # Long steps (many prompt tokens each): a request waits longer to be taken in.
                "OPENLORA_WORKER_MAX_NUM_BATCHED_TOKENS": "8192",
            },
        )
        started.append(Worker(process.start(), metrics_port))
    try:
        await asyncio.gather(*(w.process.wait_ready(timeout_s=240) for w in started))
        yield started
    finally:
        for worker in started:
            worker.process.terminate(timeout_s=10)


async def test_a_hundred_immediate_cancels_leave_both_workers_serving(
    tmp_path: Path, workers: list[Worker]
) -> None:
    gateway = await GatewayUnderTest.start(
        gateway_settings(tmp_path, [w.address for w in workers], max_concurrent_streams=256), wait_workers=2
    )
    rng = random.Random(11)

    async def cancelled(i: int) -> None:
        # A long prompt: prefills keep the step threads busy, so each request waits a step to be taken in.
        request = generate_request(f"cancel {i} " + "lorem ipsum dolor " * 100, max_new_tokens=200)
        call = gateway.stub.Generate(request, metadata=auth(ACME_KEY), timeout=60)
        if i % 4 == 3:
            await anext(aiter(call))  # after the first chunk
        elif i % 4:
            await asyncio.sleep(rng.random() * 0.05)  # while the worker takes it in
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            async for _ in call:
                pass

    try:
        await within(asyncio.gather(*(cancelled(i) for i in range(100))), 120)
        for worker in workers:
            # Every cancelled request aborted, none left in the engine; a dead step thread never gets here.
            await wait_until(lambda w=worker: w.requests_held() == 0, 60, f"{worker.address} idle")
            assert worker.process.process is not None and worker.process.process.poll() is None
            async with open_channel(worker.address, **as_role(GATEWAY, "worker")) as channel:
                assert await health_status(channel) == "SERVING"
                # Health said SERVING even with a dead step thread: each worker must still generate.
                stub = inference_pb2_grpc.InferenceStub(channel)
                probe = await worker_kit.collect(stub, worker_kit.request([5, 6, 7], max_new_tokens=3))
                assert len(probe.token_ids) == 3
        routed = await generate(gateway.stub, generate_request("probe", max_new_tokens=4), timeout=60)
        assert routed.tokens == 4
    finally:
        await gateway.stop()
