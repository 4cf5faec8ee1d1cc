"""The engine in its own process, through the front's `EngineClient`: the same tokens as the engine in
process (and HF) with coalesced streams, cancellation within a step, refusals before streaming, adapters
through handoff files, a bounded buffer for a consumer that does not read, and a clean stop.

One engine process serves the whole module (starting one costs seconds of imports)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import cast

import pytest
import pytest_asyncio
import torch
from transformers import AutoModelForCausalLM

from services.common.errors import InvalidArgument, ResourceExhausted
from services.inference.engine.kv_cache import KVCacheSpec
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import FinishReason, SamplingParams
from services.inference.engine_process.client import (
    EngineClient,
    EngineOutput,
    EngineStream,
    EngineUnavailable,
)
from services.inference.engine_process.core import EngineSpec
from services.inference.engine_process.handoff import HandoffWriter
from tests.integration.inference.hf_reference import hf_greedy

pytestmark = pytest.mark.asyncio(loop_scope="module")

BLOCK = 4


def engine_config(model: Path, **overrides: object) -> EngineConfig:
    config = AutoModelForCausalLM.from_pretrained(model).config
    block_bytes = KVCacheSpec.from_model_config(config, BLOCK, torch.float32).bytes_per_block
    values: dict[str, object] = {
        "block_size": BLOCK,
        "kv_cache_bytes": 60 * block_bytes,  # small enough that 30 streams preempt
        "max_num_batched_tokens": 40,
        "lora_slots": 2,
        "lora_max_rank": 8,
    }
    return EngineConfig(**(values | overrides))  # type: ignore[arg-type]


def start_client(model: Path, config: EngineConfig, **kwargs: object) -> EngineClient:
    def spec(inbox: str, outbox: str) -> EngineSpec:
        return EngineSpec(
            str(model), dataclasses.asdict(config), inbox, outbox, torch_threads=1, log_level="WARNING"
        )

    return EngineClient(spec, env=dict(os.environ), **kwargs)  # type: ignore[arg-type]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tiny_llama_dir: Path) -> AsyncIterator[EngineClient]:
    engine = start_client(tiny_llama_dir, engine_config(tiny_llama_dir), max_buffered_tokens=64)
    await engine.start()
    yield engine
    await engine.stop()


async def collect(
    client: EngineClient, request_id: str, prompt: list[int], n: int, **kw: object
) -> list[EngineOutput]:
    sampling = SamplingParams(max_new_tokens=n, ignore_eos=True)
    return [out async for out in client.generate(request_id, prompt, sampling, **kw)]  # type: ignore[arg-type]


def tokens(outs: list[EngineOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


async def wait_idle(client: EngineClient) -> None:
    """Until the engine reports no request and every KV block free (stats ride on each step)."""
    for _ in range(400):
        stats = client.stats()
        if (
            stats is not None
            and not client._streams
            and stats.num_running == stats.num_waiting == 0
            and stats.num_free_kv_blocks == stats.num_kv_blocks
        ):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the engine never went idle: {client.stats()}")


async def test_concurrent_streams_equal_the_engine_in_process(
    client: EngineClient, tiny_llama_dir: Path
) -> None:
    prompts = [[(11 * i + 5 * j) % 500 + 3 for j in range(4 + 6 * i)] for i in range(5)]
    got = await asyncio.gather(*(collect(client, f"s{i}", p, 12) for i, p in enumerate(prompts)))
    reference = LLMEngine.from_pretrained(tiny_llama_dir, engine_config(tiny_llama_dir, lora_slots=0))
    want = reference.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert [tokens(outs) for outs in got] == want
    assert all(outs[-1].finish_reason is FinishReason.LENGTH for outs in got)
    await wait_idle(client)


async def test_a_slow_consumer_gets_every_token_since_its_last_read_in_one_output(
    client: EngineClient,
) -> None:
    outs = []
    async for out in client.generate("slow", [5, 6, 7], SamplingParams(max_new_tokens=40, ignore_eos=True)):
        outs.append(out)
        await asyncio.sleep(0.05)  # several steps pass between two reads
    assert sum(len(o.token_ids) for o in outs) == 40
    assert len(outs) < 40 and max(len(o.token_ids) for o in outs) > 1, "outputs were not coalesced"
    await wait_idle(client)


async def test_a_stream_interval_spaces_chunks_but_not_the_first_or_the_last(client: EngineClient) -> None:
    sampling = SamplingParams(max_new_tokens=150, ignore_eos=True)
    client.stream_interval_s = 0.1
    try:
        loop = asyncio.get_running_loop()
        arrivals, outs = [], []
        async for out in client.generate("paced", [7, 8, 9], sampling):
            arrivals.append(loop.time())
            outs.append(out)
        # Only the engine's speed decides when the first token leaves; then at most one chunk per 100 ms.
        assert sum(len(o.token_ids) for o in outs) == 150
        gaps = [b - a for a, b in itertools.pairwise(arrivals[:-1])]  # the last may come sooner
        # A chunk leaves sooner only when more tokens than the buffer holds were waiting for it.
        early = [out for gap, out in zip(gaps, outs[1:], strict=False) if gap < 0.099]
        assert all(len(out.token_ids) > 64 for out in early), gaps
        assert len(outs[0].token_ids) <= 2, "the first chunk waited for the interval"

        # The end is sent when it happens, not at the next interval.
        client.stream_interval_s = 30.0
        started = loop.time()
        short = [
            o
            async for o in client.generate("ends", [7, 8], SamplingParams(max_new_tokens=20, ignore_eos=True))
        ]
        assert loop.time() - started < 30.0
        assert len(short) == 2 and short[-1].finished and sum(len(o.token_ids) for o in short) == 20
    finally:
        client.stream_interval_s = 0.0
    await wait_idle(client)


async def test_tokens_held_back_by_the_interval_leave_early_when_they_fill_the_buffer(
    client: EngineClient,
) -> None:
    client.stream_interval_s = 30.0  # far longer than the request: only a full buffer sends early
    try:
        sampling = SamplingParams(max_new_tokens=200, ignore_eos=True)  # 3 buffers' worth
        outs = [out async for out in client.generate("held", [3, 4, 5], sampling)]
    finally:
        client.stream_interval_s = 0.0
    # The reader was waiting all along: nothing is cancelled, and no chunk holds more than a
    # buffer's worth plus the step that overflowed it.
    assert sum(len(o.token_ids) for o in outs) == 200 and outs[-1].finished
    assert len(outs) >= 200 // 65
    await wait_idle(client)


async def test_a_consumer_that_stops_reading_frees_its_request(client: EngineClient) -> None:
    sampling = SamplingParams(max_new_tokens=200, ignore_eos=True)
    leaver = cast(AsyncGenerator[EngineOutput], client.generate("leaver", [4, 5, 6], sampling))
    async with contextlib.aclosing(leaver) as outs:
        async for _ in outs:
            break
    await wait_idle(client)


async def test_hundreds_of_cancels_leave_the_engine_clean(client: EngineClient) -> None:
    rng = random.Random(5)
    for i in range(200):
        task = asyncio.create_task(collect(client, f"c{i}", [3, 4, 5, 6], 50))
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)
        if i % 4 == 0:
            await asyncio.sleep(rng.random() * 0.005)  # sometimes after the engine took it in
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    tasks = [asyncio.create_task(collect(client, f"b{i}", [7, 8, 9], 50)) for i in range(100)]
    await asyncio.sleep(0.01)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await wait_idle(client)
    assert client.alive
    assert len(tokens(await collect(client, "after", [3, 4, 5], 4))) == 4


async def test_every_stream_hears_once_how_much_prompt_the_engine_took_in(client: EngineClient) -> None:
    """`on_end` is what bills a request cancelled before its first token: once per stream, after the
    engine let go of it, with the prompt tokens it had taken in."""
    ended: dict[str, list[int]] = {}
    rng = random.Random(11)

    def open_stream(request_id: str, prompt: list[int], n: int = 4) -> EngineStream:
        sampling = SamplingParams(max_new_tokens=n, ignore_eos=True)
        return client.open(
            request_id, prompt, sampling, on_end=lambda taken: ended.setdefault(request_id, []).append(taken)
        )

    def fresh_prompt(length: int) -> list[int]:  # no prefix cache hits from other tests
        return [rng.randrange(3, 200) for _ in range(length)]

    finished = open_stream("finished", fresh_prompt(5), n=2)
    while not finished.take().finished:
        await finished.news.wait()
    finished.close()
    refused = open_stream("refused", [10**6])
    await refused.news.wait()
    with pytest.raises(InvalidArgument):
        refused.take()
    refused.close()
    open_stream("never-ran", fresh_prompt(200)).close()  # the add and its abort leave together
    after_tokens = open_stream("after-tokens", fresh_prompt(7), n=100)
    while not after_tokens.take().token_ids:
        await after_tokens.news.wait()
    after_tokens.close()
    mid_prefill = [open_stream(f"mid-{i}", fresh_prompt(200)) for i in range(8)]
    for i, stream in enumerate(mid_prefill):
        await asyncio.sleep(0.002 * i)
        stream.close()
    await wait_idle(client)

    assert ended.pop("finished") == [5] and ended.pop("refused") == [0]
    assert ended.pop("never-ran") == [0] and ended.pop("after-tokens") == [7]
    # How far each prefill got depends on timing (the exact counts are the engine's own test).
    assert sorted(ended) == [f"mid-{i}" for i in range(8)]
    assert all(len(taken) == 1 and 0 <= taken[0] <= 200 for taken in ended.values()), ended
    assert not client._aborting


async def test_an_invalid_request_raises_before_any_output(client: EngineClient) -> None:
    with pytest.raises(InvalidArgument) as refused:
        await collect(client, "bad", [10**6], 4)
    assert refused.value.field == "token_ids"
    await wait_idle(client)


async def test_a_duplicate_id_is_refused_without_harming_the_first(client: EngineClient) -> None:
    first = client.generate("dup", [4, 5, 6], SamplingParams(max_new_tokens=60, ignore_eos=True))
    outs = [await anext(first)]
    with pytest.raises(InvalidArgument) as refused:
        await collect(client, "dup", [1, 2], 2)
    assert refused.value.field == "request_id"
    outs += [out async for out in first]
    assert outs[-1].finish_reason is FinishReason.LENGTH and len(tokens(outs)) == 60
    await wait_idle(client)


async def test_adapters_reach_the_engine_through_handoff_files(
    client: EngineClient, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    reference = LLMEngine.from_pretrained(tiny_llama_dir, engine_config(tiny_llama_dir))
    assert reference.residency is not None
    handoff = HandoffWriter(tmp_path)
    rng = torch.Generator().manual_seed(3)
    handles = []
    for name in ("red", "blue", "green"):  # three adapters over two slots: one is evicted and reloaded
        weights = {
            path: (
                torch.randn(4, layer.base.in_features, generator=rng) * 0.3,
                torch.randn(layer.base.out_features, 4, generator=rng) * 0.3,
            )
            for path, layer in reference.residency.pool.layers.items()
            if path.endswith(("q_proj", "v_proj"))
        }
        handles.append(handoff.publish(name, weights, 4, 2.0))
        reference.add_adapter(name, _Adapter(weights, 4, 2.0))
    work = [([9 + i, 8, 7, 6], handles[i % 3]) for i in range(9)]
    got = await asyncio.gather(
        *(collect(client, f"a{i}", prompt, 10, adapter=handle) for i, (prompt, handle) in enumerate(work))
    )
    seqs = [
        reference.add_request(
            f"ref{i}", prompt, SamplingParams(max_new_tokens=10, ignore_eos=True), adapter_key=h.key
        )
        for i, (prompt, h) in enumerate(work)
    ]
    while reference.has_unfinished():
        reference.step()
    assert [tokens(outs) for outs in got] == [s.output_token_ids for s in seqs]
    assert set(client.slots.resident_keys()) <= {"red", "blue", "green"} and client.slots.evictions > 0
    handoff.close()
    await wait_idle(client)


@dataclasses.dataclass(frozen=True)
class _Adapter:
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    scaling: float


async def test_a_consumer_that_never_reads_is_cancelled_at_its_buffer_limit(client: EngineClient) -> None:
    stream = client.generate("stalled", [4, 5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True))
    first = await anext(stream)
    await asyncio.sleep(2.0)  # the engine runs on; the buffer passes 64 tokens and the request is cut
    await wait_idle(client)
    with pytest.raises(ResourceExhausted, match="read too slowly"):
        while True:
            await anext(stream)
    assert len(first.token_ids) <= 64


async def test_many_streams_with_cancellations_and_preemption_equal_hf(
    client: EngineClient, tiny_llama_dir: Path
) -> None:
    rng = random.Random(9)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(1, 40))] for _ in range(30)]
    cancel_after = {i: rng.randint(1, 5) for i in rng.sample(range(30), 8)}
    before = client.stats()
    preempted_before = before.num_preemptions if before is not None else 0

    async def consume(i: int) -> list[int]:
        await asyncio.sleep(rng.random() * 0.05)
        got: list[int] = []
        async for out in client.generate(f"p{i}", prompts[i], SamplingParams(max_new_tokens=16)):
            got += out.token_ids
            if i in cancel_after and len(got) >= cancel_after[i]:
                break
        return got

    results = await asyncio.gather(*(consume(i) for i in range(30)))
    await wait_idle(client)
    assert client.stats().num_preemptions > preempted_before  # type: ignore[union-attr]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    for i, got in enumerate(results):
        expected = hf_greedy(hf, prompts[i], 16)
        assert got == expected[: len(got)], i
        if i not in cancel_after:
            assert got == expected, i


async def test_stopping_fails_open_streams_and_refuses_new_ones(tiny_llama_dir: Path) -> None:
    engine = start_client(tiny_llama_dir, engine_config(tiny_llama_dir, lora_slots=0))
    await engine.start()
    stream = engine.generate("s", [4, 5, 6], SamplingParams(max_new_tokens=200, ignore_eos=True))
    await anext(stream)
    await engine.stop()
    with pytest.raises(EngineUnavailable, match="shutting down"):
        while True:
            await anext(stream)
    with pytest.raises(EngineUnavailable):
        await collect(engine, "late", [1], 1)
