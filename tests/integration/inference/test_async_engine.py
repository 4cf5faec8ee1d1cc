"""The asyncio front: concurrent streams, cancellation within one step, errors before streaming."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.errors import InvalidArgument
from services.inference.engine.async_engine import AsyncEngine
from services.inference.engine.kv_cache import KVCacheSpec
from services.inference.engine.llm_engine import EngineConfig, LLMEngine, StepOutput
from services.inference.engine.sequence import FinishReason, SamplingParams
from tests.integration.inference.hf_reference import hf_greedy


@pytest.fixture
def async_engine(tiny_llama_dir: Path) -> Iterator[AsyncEngine]:
    engine = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(block_size=4, kv_cache_bytes=1 << 21))
    with AsyncEngine(engine, idle_wait_s=0.05) as front:
        yield front
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"


async def collect(front: AsyncEngine, request_id: str, prompt: list[int], n: int) -> list[StepOutput]:
    return [out async for out in front.generate(request_id, prompt, SamplingParams(max_new_tokens=n))]


async def wait_idle(front: AsyncEngine) -> None:
    """Until the step thread has applied every queued command and holds no request."""
    for _ in range(200):
        if not front._commands and not front.engine.has_unfinished():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the engine never went idle")


async def test_concurrent_streams_match_generate(async_engine: AsyncEngine, tiny_llama_dir: Path) -> None:
    prompts = [[(11 * i + 5 * j) % 500 + 3 for j in range(4 + 6 * i)] for i in range(5)]
    results = await asyncio.gather(*(collect(async_engine, f"r{i}", p, 10) for i, p in enumerate(prompts)))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for prompt, outs in zip(prompts, results, strict=True):
        assert [t for o in outs for t in o.token_ids] == hf_greedy(hf, prompt, 10)
        # The random model may emit EOS (id 0) early, as generate did.
        assert outs[-1].finish_reason is (
            FinishReason.STOP if outs[-1].token_ids == [0] else FinishReason.LENGTH
        )
        assert all(o.finish_reason is None for o in outs[:-1])


async def test_consumer_that_stops_reading_frees_its_request_within_a_step(async_engine: AsyncEngine) -> None:
    received = 0
    async for _ in async_engine.generate("long", list(range(3, 50)), SamplingParams(max_new_tokens=500)):
        received += 1
        if received == 3:
            steps_at_break = async_engine.steps
            break
    await wait_idle(async_engine)
    # The step that was running when the consumer left may finish; no step after it runs the request.
    assert async_engine.steps - steps_at_break <= 1
    assert async_engine.engine.block_manager.num_free_blocks == async_engine.engine.block_manager.num_blocks


async def test_cancelled_task_cancels_its_request(async_engine: AsyncEngine) -> None:
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in async_engine.generate("c", [5, 6, 7], SamplingParams(max_new_tokens=500)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_idle(async_engine)
    # The id is free again once the cancelled request is gone.
    outs = await collect(async_engine, "c", [5, 6, 7], 2)
    assert outs[-1].finish_reason is FinishReason.LENGTH


async def test_invalid_request_raises_before_streaming(async_engine: AsyncEngine) -> None:
    with pytest.raises(InvalidArgument) as err:
        await collect(async_engine, "bad", [], 3)
    assert err.value.field == "token_ids"


async def test_duplicate_id_is_refused_without_harming_the_first(async_engine: AsyncEngine) -> None:
    params = SamplingParams(max_new_tokens=300, ignore_eos=True)
    first = async_engine.generate("same", [9, 8, 7], params)
    outs = [await anext(first)]
    with pytest.raises(InvalidArgument) as err:
        await collect(async_engine, "same", [1, 2], 3)
    assert err.value.field == "request_id"
    outs += [out async for out in first]
    assert outs[-1].finish_reason is FinishReason.LENGTH and sum(len(o.token_ids) for o in outs) == 300


async def test_stopping_the_engine_cancels_open_streams(tiny_llama_dir: Path) -> None:
    engine = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(block_size=4, kv_cache_bytes=1 << 21))
    front = AsyncEngine(engine, idle_wait_s=0.05)
    front.start()
    outs: list[StepOutput] = []
    async for out in front.generate("s", [4, 5, 6], SamplingParams(max_new_tokens=1000, ignore_eos=True)):
        outs.append(out)
        if len(outs) == 2:
            await asyncio.to_thread(front.stop)
    assert outs[-1].finish_reason is FinishReason.CANCELLED
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    with pytest.raises(RuntimeError, match="not running"):
        await collect(front, "late", [1], 1)


class _RandomAdapter:
    """A rank-4 adapter on q_proj and v_proj of every layer, as the adapter cache would hand it over."""

    def __init__(self, engine: LLMEngine) -> None:
        assert engine.residency is not None
        g = torch.Generator().manual_seed(3)
        self.rank, self.scaling = 4, 2.0
        self.weights = {
            name: (
                torch.randn(4, layer.base.in_features, generator=g) * 0.3,
                torch.randn(layer.base.out_features, 4, generator=g) * 0.3,
            )
            for name, layer in engine.residency.pool.layers.items()
            if name.endswith(("q_proj", "v_proj"))
        }


async def test_request_waiting_for_its_adapter_does_not_stall_others(tiny_llama_dir: Path) -> None:
    host: dict[str, _RandomAdapter] = {}
    requested: list[str] = []
    engine = LLMEngine.from_pretrained(
        tiny_llama_dir,
        EngineConfig(block_size=4, kv_cache_bytes=1 << 21, lora_slots=1, lora_max_rank=8),
        adapter_lookup=host.get,
        request_adapter=requested.append,
    )
    prompt = [12, 34, 56, 78]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    # A long idle wait: only wake() can resume the loop quickly once the adapter is resident.
    with AsyncEngine(engine, idle_wait_s=30.0) as front:

        async def cold() -> list[StepOutput]:
            return [o async for o in front.generate("cold", prompt, params, adapter_key="cold-adapter")]

        cold_task = asyncio.create_task(cold())
        base = [o async for o in front.generate("base", prompt, params)]
        assert base[-1].finish_reason is FinishReason.LENGTH
        assert not cold_task.done(), "the cold request waits for its adapter"
        assert "cold-adapter" in requested  # its load was asked for while the base request ran
        host["cold-adapter"] = _RandomAdapter(engine)  # the load lands (the cache's on_resident)
        front.wake()
        cold_outs = await asyncio.wait_for(cold_task, timeout=5.0)
    assert len([t for o in cold_outs for t in o.token_ids]) == 6
    assert [t for o in cold_outs for t in o.token_ids] != [t for o in base for t in o.token_ids]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


async def test_many_streams_with_cancellations_and_preemption(tiny_llama_dir: Path) -> None:
    config = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config
    block_bytes = KVCacheSpec.from_model_config(config, 4, torch.float32).bytes_per_block
    engine = LLMEngine.from_pretrained(
        tiny_llama_dir, EngineConfig(block_size=4, kv_cache_bytes=30 * block_bytes, max_num_batched_tokens=40)
    )
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    cancel_after = {i: rng.randint(1, 5) for i in rng.sample(range(30), 8)}

    async def client(i: int) -> list[int]:
        await asyncio.sleep(rng.random() * 0.05)
        tokens: list[int] = []
        async for out in front.generate(f"c{i}", prompts[i], SamplingParams(max_new_tokens=16)):
            tokens += out.token_ids
            if len(tokens) == cancel_after.get(i):
                break
        return tokens

    with AsyncEngine(engine, idle_wait_s=0.05) as front:
        results = await asyncio.gather(*(client(i) for i in range(30)))
        await wait_idle(front)
    assert engine.scheduler.num_preemptions > 0
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for i, tokens in enumerate(results):
        expected = hf_greedy(hf, prompts[i], 16)
        if i in cancel_after:
            assert tokens == expected[: len(tokens)] and len(tokens) <= cancel_after[i]
        else:
            assert tokens == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
