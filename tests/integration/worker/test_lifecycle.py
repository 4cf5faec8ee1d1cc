"""Readiness, and usage with attribution unreachable: generation goes on, the spool alarms when full."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
from openlora.v1 import inference_pb2, inference_pb2_grpc

from services.common.grpc_client import health_status, open_channel
from services.common.trust.roles import GATEWAY
from services.inference.app import WorkerApp
from services.inference.engine.llm_engine import LLMEngine
from tests.integration.worker.kit import WorkerUnderTest, collect, request, worker_settings
from tests.kit.ports import free_port
from tests.kit.service_auth import as_role
from tests.kit.waits import within


async def test_health_is_not_serving_until_the_model_is_loaded(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    load = LLMEngine.from_pretrained

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)
        return load(*args, **kwargs)

    monkeypatch.setattr(LLMEngine, "from_pretrained", slow_load)
    worker = WorkerApp(worker_settings(tmp_path, tiny_llama_dir))
    port = await worker.start()
    try:
        async with open_channel(f"127.0.0.1:{port}", **as_role(GATEWAY, "worker")) as channel:
            assert await health_status(channel) == "NOT_SERVING"
            assert await health_status(channel, "openlora.v1.Inference") == "NOT_SERVING"
            stub = inference_pb2_grpc.InferenceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, request([1, 2]))
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            release.set()
            await worker.wait_ready()
            assert await health_status(channel) == "SERVING"
            assert len((await collect(stub, request([1, 2], max_new_tokens=3))).token_ids) == 3
    finally:
        release.set()
        await worker.stop()


async def test_a_model_that_cannot_load_fails_the_start(tmp_path: Path, tiny_llama_dir: Path) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    worker = WorkerApp(worker_settings(tmp_path, broken))
    await worker.start()
    try:
        with pytest.raises(Exception, match=r"(?i)json|config"):
            await worker.wait_ready()
    finally:
        await worker.stop()


async def test_attribution_down_neither_slows_nor_stops_generation_and_a_full_spool_alarms(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    settings = worker_settings(
        tmp_path,
        tiny_llama_dir,
        attribution_address=f"127.0.0.1:{free_port()}",  # nothing listens there
        spool_max_bytes=4096,  # the least allowed: a few dozen records
        # Every flush adds a record per running request (its tokens since the last flush), so the
        # record count follows the generation's length in flushes, not the machine's speed: 10
        # requests of 100 steps each run for many 10 ms flushes on any CPU. Not more requests: on a
        # loaded machine the first flush can come after every prefill, and its batch (a prompt and a
        # completion record per request, ~120 bytes each, three if a minute turns) must fit the
        # 4096-byte budget for the spool to hold anything at all (24 requests made 5.8 kB).
        usage_flush_interval_s=0.01,
        stream_interval_s=0.0,
    )
    worker = await WorkerUnderTest.start(settings)
    try:
        streams = [
            collect(worker.stub, request([1 + i, 2, 3, 4, 5, 6, 7, 8], max_new_tokens=100)) for i in range(10)
        ]
        done = await within(asyncio.gather(*streams), timeout=60)
        assert all(len(s.token_ids) == 100 for s in done)
        await asyncio.sleep(0.2)  # a few flushes
        metrics = worker.metrics()
        assert metrics["openlora_usage_spool_full_total"] >= 1
        assert metrics["openlora_usage_buffered_records"] > 0  # kept in memory, not dropped
        assert 0 < metrics["openlora_usage_spool_backlog_bytes"] <= 4096
        assert metrics["openlora_usage_connected"] == 0
        reply = await worker.stub.ListModels(inference_pb2.ListModelsRequest())
        assert reply.stats.kv_blocks_used == 0
    finally:
        await worker.stop()
