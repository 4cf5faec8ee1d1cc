"""The step loop survives any one request: cancels racing the take-in, commands that raise; a failed step
ends it for everyone and tells the owner."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from services.inference.engine.async_engine import AsyncEngine
from services.inference.engine.llm_engine import EngineConfig, LLMEngine, StepOutput
from services.inference.engine.sequence import FinishReason, SamplingParams
from tests.integration.inference.test_async_engine import collect, wait_idle


def tiny_engine(model: Path) -> LLMEngine:
    return LLMEngine.from_pretrained(model, EngineConfig(block_size=4, kv_cache_bytes=1 << 21))


def assert_clean(front: AsyncEngine) -> None:
    assert front.alive and front.failure is None
    assert not front.engine.has_unfinished() and not front._streams
    bm = front.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"


async def test_hundreds_of_cancels_racing_the_take_in_leave_the_loop_alive(tiny_llama_dir: Path) -> None:
    rng = random.Random(5)
    with AsyncEngine(tiny_engine(tiny_llama_dir), idle_wait_s=0.05) as front:
        for i in range(300):
            task = asyncio.create_task(collect(front, f"c{i}", [3, 4, 5, 6], 50))
            # Cancel before the task ran, while it waits for the take-in, or while the thread takes it in.
            for _ in range(i % 4):
                await asyncio.sleep(0)
            if i % 3 == 0:
                # Blocking the event loop on purpose: the step thread takes the request in meanwhile.
                time.sleep(rng.random() * 0.001)  # noqa: ASYNC251
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Many at once, cancelled together.
        tasks = [asyncio.create_task(collect(front, f"b{i}", [7, 8, 9], 50)) for i in range(100)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await wait_idle(front)
        assert_clean(front)
        outs = await asyncio.wait_for(collect(front, "after", [3, 4, 5], 4), 30)
        assert outs[-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
        await wait_idle(front)
        assert_clean(front)


async def test_a_command_that_raises_fails_only_its_request(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tiny_engine(tiny_llama_dir)
    add, abort = engine.add_request, engine.abort

    def add_request(request_id: str, *args: Any, **kwargs: Any) -> Any:
        if request_id == "bad-add":
            raise ValueError("boom in add")
        return add(request_id, *args, **kwargs)

    def abort_request(request_id: str) -> StepOutput | None:
        if request_id == "bad-abort":
            raise ValueError("boom in abort")
        return abort(request_id)

    monkeypatch.setattr(engine, "add_request", add_request)
    monkeypatch.setattr(engine, "abort", abort_request)
    with AsyncEngine(engine, idle_wait_s=0.05) as front:
        other = asyncio.create_task(collect(front, "other", [5, 6, 7], 30))
        with pytest.raises(ValueError, match="boom in add"):
            await collect(front, "bad-add", [5, 6, 7], 3)
        # The consumer leaves; its abort raises: the request runs out by itself, nobody reads it.
        stream = front.generate("bad-abort", [1, 2, 3], SamplingParams(max_new_tokens=20))
        async with contextlib.aclosing(stream):  # type: ignore[type-var]
            await anext(stream)
        assert (await other)[-1].finished
        await wait_idle(front)
        assert_clean(front)
        assert (await asyncio.wait_for(collect(front, "after", [3, 4, 5], 4), 30))[-1].finished


async def test_a_failed_step_fails_every_stream_and_calls_the_failure_callback(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = tiny_engine(tiny_llama_dir)
    failed: list[BaseException] = []
    called = threading.Event()

    def on_failure(exc: BaseException) -> None:
        assert threading.current_thread().name == "engine-step-loop"
        failed.append(exc)
        called.set()

    front = AsyncEngine(engine, idle_wait_s=0.05, on_failure=on_failure)
    front.start()
    try:
        params = SamplingParams(max_new_tokens=1000, ignore_eos=True)
        streams = [front.generate(f"s{i}", [4, 5, 6 + i], params) for i in range(3)]
        for stream in streams:
            await anext(stream)  # in flight
        injected = RuntimeError("injected step failure")

        def broken_step() -> list[StepOutput]:
            raise injected

        monkeypatch.setattr(engine, "step", broken_step)
        for stream in streams:
            with pytest.raises(RuntimeError, match="engine step failed"):
                async for _ in stream:
                    pass
        assert await asyncio.to_thread(called.wait, 10)
        assert failed == [injected] and front.failure is injected and not front.alive
        with pytest.raises(RuntimeError, match="engine failed"):
            await collect(front, "late", [1, 2], 2)
    finally:
        await asyncio.to_thread(front.stop)
