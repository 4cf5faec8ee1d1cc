"""A worker whose engine step fails leaves the pool: NOT_SERVING at once, its streams end UNAVAILABLE,
new calls are refused, and `run()` raises (so `openlora worker serve` exits non-zero)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from services.common.grpc_client import health_status, open_channel
from services.common.proto import inference_pb2, inference_pb2_grpc
from services.inference.engine.llm_engine import StepOutput
from services.inference.server import Worker
from tests.integration.worker.kit import collect, request, wait_until, worker_settings


async def test_a_failed_step_turns_the_worker_not_serving_and_its_streams_unavailable(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A delay before the drain keeps the server up long enough to see what probes see.
    worker = Worker(worker_settings(tmp_path, tiny_llama_dir, shutdown_delay_s=3.0, grace_period_s=2.0))
    ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    running = asyncio.create_task(worker.run(ready.set_result))
    try:
        port = await asyncio.wait_for(asyncio.shield(ready), 120)
        async with open_channel(f"127.0.0.1:{port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            assert await health_status(channel) == "SERVING"
            chunks: list[inference_pb2.GenerateChunk] = []

            async def stream() -> None:
                async for chunk in stub.Generate(request([1, 2, 3], max_new_tokens=4000), timeout=60):
                    chunks.append(chunk)

            in_flight = asyncio.create_task(stream())
            await wait_until(lambda: bool(chunks), 30, "the first chunk")

            def broken_step() -> list[StepOutput]:
                raise RuntimeError("injected step failure")

            assert worker.engine is not None
            monkeypatch.setattr(worker.engine.engine, "step", broken_step)
            injected = asyncio.get_running_loop().time()
            while await health_status(channel) != "NOT_SERVING":
                assert asyncio.get_running_loop().time() - injected < 1.0, "still SERVING after 1 s"
                await asyncio.sleep(0.02)
            with pytest.raises(grpc.aio.AioRpcError) as broken:
                await in_flight
            assert broken.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(stub, request([1, 2], max_new_tokens=2))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(RuntimeError, match="step loop failed"):
            await asyncio.wait_for(running, 30)
    finally:
        if not running.done():
            worker.server.stop()
        await asyncio.gather(running, return_exceptions=True)
