"""A worker in the test's event loop, with a real adapter store and a real attribution server:
streams equal the engine's own output, usage reaches the ledger exactly, ListModels and metrics
tell the truth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from openlora.v1 import attribution_pb2, attribution_pb2_grpc, inference_pb2, inference_pb2_grpc
from transformers import AutoTokenizer

from services.attribution.app import AttributionApp, build
from services.common.grpc_client import open_channel
from services.common.trust.roles import GATEWAY
from services.inference.adapter_cache import LoadedAdapter
from services.inference.app import WorkerApp
from tests.integration.attribution.wire import attribution_settings
from tests.integration.inference.cache_kit import Store, open_cache, small_adapter, start_store
from tests.integration.worker.kit import (
    WorkerUnderTest,
    collect,
    ledger_adapters,
    ledger_counts,
    reference_outputs,
    request,
    served_requests,
    worker_settings,
)
from tests.kit.cpu import cpu_lora_op
from tests.kit.service_auth import as_role, trusted
from tests.kit.waits import wait_until

PROMPT, COMPLETION = attribution_pb2.PROMPT, attribution_pb2.COMPLETION


@dataclass
class Cluster:
    store: Store
    attribution: AttributionApp
    ledger_url: str
    worker: WorkerUnderTest
    adapters: dict[str, LoadedAdapter]  # engine key -> adapter, as the store serves it


@pytest.fixture
async def cluster(tmp_path: Path, tiny_llama_dir: Path) -> AsyncIterator[Cluster]:
    store = await start_store(tmp_path / "store", tiny_llama_dir)
    ledger_url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    attribution = build(attribution_settings(ledger_url, grace_period_s=1.0))
    await attribution.start()
    for i in range(3):
        await store.upload(small_adapter(tiny_llama_dir, tmp_path / f"a{i}", seed=i, rank=4 + 2 * i), f"a{i}")
    reader = await open_cache(store, tmp_path / "reference-cache")
    adapters = {a.key: a for a in [(await reader.get(f"a{i}")).adapter for i in range(3)]}
    await reader.close()
    settings = worker_settings(
        tmp_path,
        tiny_llama_dir,
        store_address=f"127.0.0.1:{store.server.port}",
        attribution_address=f"127.0.0.1:{attribution.server.port}",
        lora_slots=2,  # fewer than the adapters: requests also wait for slots
        max_num_batched_tokens=8,  # a long prompt's prefill takes many steps: time to cancel within it
    )
    worker = await WorkerUnderTest.start(settings)
    yield Cluster(store, attribution, ledger_url, worker, adapters)
    await worker.stop()
    await attribution.close()
    await store.stop()


async def test_streams_equal_the_engine_and_usage_reaches_the_ledger(
    cluster: Cluster, tiny_llama_dir: Path
) -> None:
    keys = [None, *cluster.adapters]
    plan = [
        ([5 + i, 17, 40 + 3 * i, 9, 11 + i][: 2 + i % 4], keys[i % len(keys)], 6 + i % 5) for i in range(12)
    ]
    messages = [
        request(
            prompt, adapter=key.split("@")[0] if key and i % 2 else key, max_new_tokens=n, request_id=f"r{i}"
        )
        for i, (prompt, key, n) in enumerate(plan)
    ]
    streamed = await asyncio.gather(*(collect(cluster.worker.stub, m) for m in messages))
    expected = await asyncio.to_thread(reference_outputs, tiny_llama_dir, cluster.adapters, plan, 2)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for i, (got, want, (prompt, _, n)) in enumerate(zip(streamed, expected, plan, strict=True)):
        assert got.token_ids == want, f"request {i}"
        assert got.finish_reason == inference_pb2.LENGTH
        assert (got.prompt_tokens, got.completion_tokens) == (len(prompt), n)
        assert got.text == tokenizer.decode(want, skip_special_tokens=True)
    want_ledger = {(f"r{i}", PROMPT): len(p) for i, (p, _, _) in enumerate(plan)} | {
        (f"r{i}", COMPLETION): n for i, (_, _, n) in enumerate(plan)
    }
    await wait_until(lambda: ledger_counts(cluster.ledger_url) == want_ledger, what="the ledger")
    assert all(len(usage_ids) == 1 for usage_ids in served_requests(cluster.ledger_url).values())
    reporter = cluster.worker.worker.reporter
    assert reporter is not None
    await wait_until(lambda: reporter.spool.backlog_batches == 0, what="an empty spool")


async def test_a_reused_request_id_bills_every_stream_to_its_own_tenant(cluster: Cluster) -> None:
    """Client ids are labels: five streams under one id, four of them while the first still runs and
    one from another tenant, are five requests in the ledger, each billed every token it streamed."""
    stub = cluster.worker.stub
    first = stub.Generate(request([9, 8, 7], max_new_tokens=8, request_id="job-42", tenant="demo"))
    opening = await first.read()
    assert isinstance(opening, inference_pb2.GenerateChunk)
    first_ids = list(opening.token_ids)
    others = await asyncio.gather(
        *(
            collect(stub, request([9, 8, 7], max_new_tokens=8, request_id="job-42", tenant=tenant))
            for tenant in ("demo", "evil", "demo", "demo")
        )
    )
    while (chunk := await first.read()) is not grpc.aio.EOF:
        assert isinstance(chunk, inference_pb2.GenerateChunk)
        first_ids += chunk.token_ids
    assert len(first_ids) == 8 and all(streamed.completion_tokens == 8 for streamed in others)

    await wait_until(
        lambda: ledger_counts(cluster.ledger_url).get(("job-42", COMPLETION)) == 5 * 8, what="usage"
    )
    assert len(served_requests(cluster.ledger_url)["job-42"]) == 5
    async with open_channel(
        f"127.0.0.1:{cluster.attribution.server.port}", **trusted("attribution")
    ) as channel:
        attribution = attribution_pb2_grpc.AttributionStub(channel)
        for tenant, requests in (("demo", 4), ("evil", 1)):
            report = await attribution.GetUsage(
                attribution_pb2.UsageQuery(request_id="job-42", tenant=tenant), timeout=10
            )
            assert (report.totals.prompt_tokens, report.totals.completion_tokens) == (
                3 * requests,
                8 * requests,
            )


async def test_text_prompts_are_tokenized_and_decoded(cluster: Cluster, tiny_llama_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    text = "the adapter serves a token stream — héllo wörld"
    got = await collect(cluster.worker.stub, request(text, max_new_tokens=12))
    assert got.prompt_tokens == len(tokenizer.encode(text))
    assert got.text == tokenizer.decode(got.token_ids, skip_special_tokens=True)


async def test_list_models_reports_model_engine_and_cache(cluster: Cluster, tiny_llama_dir: Path) -> None:
    key = next(iter(cluster.adapters))
    await collect(cluster.worker.stub, request([1, 2, 3], adapter=key))
    reply = await cluster.worker.stub.ListModels(inference_pb2.ListModelsRequest())
    assert reply.base_model.name == tiny_llama_dir.name
    assert reply.base_model.max_context > 0 and reply.base_model.dtype == "float32"
    assert (reply.attention_backend, reply.worker_id) == ("torch", "worker-test")
    assert reply.lora_op == cpu_lora_op()
    assert reply.stats.kv_blocks_total > 0 and reply.stats.kv_blocks_used == 0
    listed = {f"{a.adapter.id}@{a.adapter.version}": a for a in reply.adapters}
    assert listed[key].tier == inference_pb2.DEVICE
    assert listed[key].rank == cluster.adapters[key].rank
    assert listed[key].digest == cluster.adapters[key].digest


async def test_cancelling_a_stream_frees_its_kv_blocks(cluster: Cluster) -> None:
    stub = cluster.worker.stub
    call = stub.Generate(request(list(range(1, 40)), max_new_tokens=400, request_id="to-cancel"))
    got = 0
    async for chunk in call:
        got += len(chunk.token_ids)
        if got >= 3:
            break
    reply = await stub.ListModels(inference_pb2.ListModelsRequest())
    assert reply.stats.kv_blocks_used > 0 and reply.stats.running_requests == 1
    call.cancel()

    async def blocks_used() -> int:
        return (await stub.ListModels(inference_pb2.ListModelsRequest())).stats.kv_blocks_used

    for _ in range(100):
        if await blocks_used() == 0:
            break
        await asyncio.sleep(0.05)
    assert await blocks_used() == 0
    metrics = cluster.worker.metrics()
    assert metrics["openlora_kv_blocks_used"] == 0 and metrics["openlora_running_requests"] == 0
    assert metrics["openlora_time_to_first_token_seconds_count"] >= 1


async def test_a_stream_cancelled_during_its_prefill_is_billed_the_prefill_done(cluster: Cluster) -> None:
    """The client hangs up before its first token; the prompt tokens the engine had computed by then
    are billed (and nothing generated), once the engine answered the abort."""
    stub = cluster.worker.stub
    prompt = [3 + i % 200 for i in range(3000)]  # 375 steps of 8 prompt tokens
    call = stub.Generate(request(prompt, max_new_tokens=8, request_id="cut-short"))

    async def prefilling() -> bool:
        stats = (await stub.ListModels(inference_pb2.ListModelsRequest())).stats
        return stats.running_requests == 1 and stats.kv_blocks_used > 0

    for _ in range(2000):
        if await prefilling():
            break
        await asyncio.sleep(0.002)
    call.cancel()
    await wait_until(
        lambda: ("cut-short", PROMPT) in ledger_counts(cluster.ledger_url), what="the prefill's usage"
    )
    billed = ledger_counts(cluster.ledger_url)
    prompt_billed = billed[("cut-short", PROMPT)]
    if ("cut-short", COMPLETION) in billed:  # a loaded machine let the first token out before the cancel
        assert prompt_billed == len(prompt)
    else:
        assert 0 < prompt_billed <= len(prompt)
    assert len(served_requests(cluster.ledger_url)["cut-short"]) == 1
    await wait_until(lambda: cluster.worker.metrics()["openlora_kv_blocks_used"] == 0, what="free blocks")


async def test_an_expired_deadline_ends_the_stream_and_frees_its_blocks(cluster: Cluster) -> None:
    import grpc

    stub = cluster.worker.stub
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.Generate(request([1, 2, 3], max_new_tokens=2000), timeout=0.5):
            pass
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await wait_until(
        lambda: cluster.worker.metrics()["openlora_kv_blocks_used"] == 0, timeout=5, what="free blocks"
    )


async def test_a_mix_streams_its_derived_adapter_and_credits_each_component(
    cluster: Cluster, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    from openlora.v1 import common_pb2

    from services.inference.validation import mix_spec

    first, second = list(cluster.adapters.values())[:2]
    mix = common_pb2.AdapterMix(
        strategy=common_pb2.LINEAR,
        components=[
            common_pb2.Component(adapter=common_pb2.AdapterRef(id=first.id), weight=1.0),
            common_pb2.Component(adapter=common_pb2.AdapterRef(id=second.id), weight=3.0),
        ],
    )
    message = request([4, 8, 15, 16], max_new_tokens=6, request_id="mixed")
    message.mix.CopyFrom(mix)
    got = await collect(cluster.worker.stub, message)
    reader = await open_cache(cluster.store, tmp_path / "mix-reference")
    derived = (await reader.get_mix(mix_spec(mix, field="mix"))).adapter
    await reader.close()
    expected = await asyncio.to_thread(
        reference_outputs, tiny_llama_dir, {derived.key: derived}, [([4, 8, 15, 16], derived.key, 6)], 1
    )
    assert got.token_ids == expected[0]
    await wait_until(lambda: len(ledger_counts(cluster.ledger_url)) == 2, what="the mixed request's usage")
    credited = ledger_adapters(cluster.ledger_url, "mixed")
    assert credited == {f"{first.id} {first.version} 250000;{second.id} {second.version} 750000"}


async def test_each_request_is_one_span_with_a_child_span_for_its_adapter_load(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = await start_store(tmp_path / "store", tiny_llama_dir)
    await store.upload(small_adapter(tiny_llama_dir, tmp_path / "traced", seed=5), "traced")
    settings = worker_settings(tmp_path, tiny_llama_dir, store_address=f"127.0.0.1:{store.server.port}")
    worker = WorkerApp(settings, tracer_provider=provider)
    port = await worker.start()
    try:
        await worker.wait_ready()
        async with open_channel(f"127.0.0.1:{port}", **as_role(GATEWAY, "worker")) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            for request_id in ("cold", "warm"):
                await collect(
                    stub, request([1, 2, 3], adapter="traced", max_new_tokens=5, request_id=request_id)
                )
    finally:
        await worker.stop()
        await store.stop()
    spans = exporter.get_finished_spans()
    requests = {
        s.attributes["openlora.request_id"]: s for s in spans if s.name == "generate" and s.attributes
    }
    loads = [s for s in spans if s.name == "adapter.load"]
    assert set(requests) == {"cold", "warm"} and len(loads) == 2
    cold, warm = requests["cold"], requests["warm"]
    assert cold.attributes is not None and warm.attributes is not None
    assert str(cold.attributes["openlora.adapter.key"]).startswith("traced@")
    assert (cold.attributes["openlora.tokens.prompt"], cold.attributes["openlora.tokens.completion"]) == (
        3,
        5,
    )
    assert cold.attributes["openlora.cache.tier"] == "store"
    assert warm.attributes["openlora.cache.tier"] in ("device", "host")
    assert cold.attributes["openlora.outcome"] == "length"
    parents = {load.parent.span_id for load in loads if load.parent is not None}
    assert parents == {cold.context.span_id, warm.context.span_id}


async def test_samples_stream_interleaved_and_bill_the_prompt_once(cluster: Cluster) -> None:
    """n = 3 on a worker's own Generate: each sample's chunks name it, each sample ends with its
    finish reason, usage (all samples) rides on the very last chunk, and the ledger has the prompt
    once and every sample's tokens."""
    message = request(
        [4, 8, 15, 16, 23, 42], max_new_tokens=5, request_id="fan", n=3, temperature=1.0, seed=9
    )
    chunks = [c async for c in cluster.worker.stub.Generate(message)]
    texts: dict[int, list[int]] = {}
    for chunk in chunks:
        texts.setdefault(chunk.index, []).extend(chunk.token_ids)
    assert sorted(texts) == [0, 1, 2] and all(len(ids) == 5 for ids in texts.values())
    assert sorted(c.index for c in chunks if c.finish_reason) == [0, 1, 2]
    with_usage = [c for c in chunks if c.HasField("usage")]
    assert with_usage == [chunks[-1]]
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (6, 15)
    await wait_until(
        lambda: (
            {k: v for k, v in ledger_counts(cluster.ledger_url).items() if k[0] == "fan"}
            == {("fan", PROMPT): 6, ("fan", COMPLETION): 15}
        ),
        what="the ledger",
    )
