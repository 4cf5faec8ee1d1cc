"""A worker whose engine process dies: its streams end UNAVAILABLE at once, health turns NOT_SERVING,
a fresh engine is started and the worker serves again; one that keeps dying makes the worker exit
non-zero (`run()` raises), so its orchestrator steps in."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest
from openlora.v1 import inference_pb2, inference_pb2_grpc

from services.common.grpc_client import health_status, open_channel
from services.common.trust.roles import GATEWAY
from services.inference.app import WorkerApp
from tests.integration.worker.kit import collect, request, worker_settings
from tests.kit.service_auth import as_role
from tests.kit.waits import wait_until, within


async def _stream_until_first_chunk(
    stub: inference_pb2_grpc.InferenceAsyncStub, chunks: list[inference_pb2.GenerateChunk]
) -> asyncio.Task[None]:
    async def stream() -> None:
        async for chunk in stub.Generate(request([1, 2, 3], max_new_tokens=4000), timeout=60):
            chunks.append(chunk)

    in_flight = asyncio.create_task(stream())
    await wait_until(lambda: bool(chunks), 30, "the first chunk")
    return in_flight


async def test_a_killed_engine_fails_its_streams_and_is_replaced(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    worker = WorkerApp(worker_settings(tmp_path, tiny_llama_dir))
    port = await worker.start()
    await worker.wait_ready()
    try:
        async with open_channel(f"127.0.0.1:{port}", **as_role(GATEWAY, "worker")) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            assert await health_status(channel) == "SERVING"
            chunks: list[inference_pb2.GenerateChunk] = []
            in_flight = await _stream_until_first_chunk(stub, chunks)
            assert worker.engine is not None and worker.engine.pid is not None
            first_pid = worker.engine.pid
            os.kill(first_pid, signal.SIGKILL)
            killed = asyncio.get_running_loop().time()
            with pytest.raises(grpc.aio.AioRpcError) as broken:
                await in_flight
            assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
            assert asyncio.get_running_loop().time() - killed < 5.0
            assert await health_status(channel) == "NOT_SERVING"
            deadline = killed + 30.0
            while await health_status(channel) != "SERVING":
                assert asyncio.get_running_loop().time() < deadline, "not SERVING 30 s after the kill"
                await asyncio.sleep(0.1)
            assert worker.engine.pid not in (None, first_pid)
            served = await collect(stub, request([1, 2], max_new_tokens=5))
            assert len(served.token_ids) == 5
            assert worker.engine.restarts == 1
    finally:
        await worker.stop()


async def test_an_engine_that_keeps_dying_makes_the_worker_exit(tmp_path: Path, tiny_llama_dir: Path) -> None:
    # No restart allowed: the first crash is one too many.
    worker = WorkerApp(worker_settings(tmp_path, tiny_llama_dir, engine_max_restarts=0, grace_period_s=1.0))
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    running = asyncio.create_task(worker.run(ready.set_result))
    try:
        port = await within(asyncio.shield(ready), 120)
        async with open_channel(f"127.0.0.1:{port}", **as_role(GATEWAY, "worker")) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            chunks: list[inference_pb2.GenerateChunk] = []
            in_flight = await _stream_until_first_chunk(stub, chunks)
            assert worker.engine is not None
            worker.engine.kill()
            with pytest.raises(grpc.aio.AioRpcError) as broken:
                await in_flight
            assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RuntimeError, match="keeps failing"):
            await within(running, 30)
    finally:
        if not running.done():
            worker.server.stop()
        await asyncio.gather(running, return_exceptions=True)
