"""The whole cluster as real processes on PostgreSQL and SeaweedFS (tiny model), driven like a tenant
would: upload through the gateway, generate (an adapter, a mix, a cancelled stream), then check the
ledger, the rewards and one request's trace across every service; last, concurrent streams of every
kind, each one's usage equal to what it streamed and its ledger rows tiling its tokens exactly."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest
import sqlalchemy as sa
from openlora import AsyncClient, Client, MixComponent
from openlora.v1 import (
    attribution_pb2,
    attribution_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)

from services.attribution.models import UsageEvent
from services.cluster.up import Cluster, ClusterConfig
from tests.e2e.cluster_kit import eventually, operator, running_cluster, steady, upload_adapter
from tests.kit.otlp_receiver import OtlpReceiver
from tests.kit.postgres import create_database, drop_database
from tests.kit.seaweedfs import S3Endpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = "e2e"
T = TypeVar("T")
# Completion tokens a cancelled stream may be billed beyond those it read: the chunks the worker had
# handed over (and sent) before the cancel reached it, each up to a stream interval's tokens.
ON_THE_WIRE = 64


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def database_url() -> Iterator[str]:
    """The ledger's database, for tests that read its rows directly; dropped after the cluster stops."""
    url = create_database("openlora_e2e")
    yield url
    drop_database(url)


@pytest.fixture(scope="module")
def cluster(
    s3_server: S3Endpoint,
    otlp: OtlpReceiver,
    database_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Cluster]:
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    env = {
        "OPENLORA_STORE_BACKEND": "s3",
        "OPENLORA_STORE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "OPENLORA_STORE_S3_BUCKET": bucket,
        "OPENLORA_STORE_S3_ACCESS_KEY_ID": s3_server.access_key,
        "OPENLORA_STORE_S3_SECRET_ACCESS_KEY": s3_server.secret_key,
        "OPENLORA_STORE_S3_REGION": s3_server.region,
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # export within a fraction of a second, not 5 s
    }
    config = ClusterConfig(
        data_dir=tmp_path_factory.mktemp("cluster"),
        model="tiny",
        gateway_port=0,
        http_port=0,
        database_url=database_url,
        tenant=TENANT,
    )
    with running_cluster(config, env) as (running, _logs):
        for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
            asyncio.run(upload_adapter(running, name, seed, tmp_path_factory.mktemp(name)))
        yield running


def ledger_tokens(cluster: Cluster) -> int:
    with grpc.insecure_channel(cluster.attribution) as channel:
        report = attribution_pb2_grpc.AttributionStub(channel).GetUsage(
            attribution_pb2.UsageQuery(tenant=TENANT), timeout=10, metadata=operator(cluster, "attribution")
        )
    return int(report.totals.prompt_tokens + report.totals.completion_tokens)


def settled_ledger(cluster: Cluster, expected: int | None = None) -> int:
    """The ledger's token count once usage stopped arriving (or reached `expected`)."""
    last, stable_since = -1, time.monotonic()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        now = ledger_tokens(cluster)
        if expected is not None and now == expected:
            return now
        if now != last:
            last, stable_since = now, time.monotonic()
        elif expected is None and time.monotonic() - stable_since > 2.0:
            return now
        time.sleep(0.25)
    return last


def worker_idle(cluster: Cluster) -> bool | None:
    with grpc.insecure_channel(cluster.workers[0]) as channel:
        reply = inference_pb2_grpc.InferenceStub(channel).ListModels(
            inference_pb2.ListModelsRequest(), timeout=10, metadata=operator(cluster, "worker")
        )
    idle = reply.stats.running_requests == 0 and reply.stats.kv_blocks_used == 0
    return True if idle else None


def test_adapters_and_a_mix_are_billed_exactly_and_rewards_follow_provenance(cluster: Cluster) -> None:
    before = settled_ledger(cluster)
    with Client(cluster.gateway, api_key=cluster.api_key) as client:
        alpha = client.generate("Tell me about the sea", adapter=f"{TENANT}/alpha", max_new_tokens=12)
        beta = client.generate("Tell me about cooking", adapter=f"{TENANT}/beta", max_new_tokens=9)
        mixed = client.generate(
            "Tell me about both",
            mix=[MixComponent(f"{TENANT}/alpha", 1.0), MixComponent(f"{TENANT}/beta", 1.0)],
            max_new_tokens=10,
        )
    counts = {
        name: c.prompt_tokens + c.completion_tokens for name, c in (("a", alpha), ("b", beta), ("m", mixed))
    }
    assert (alpha.completion_tokens, beta.completion_tokens, mixed.completion_tokens) == (12, 9, 10)
    assert settled_ledger(cluster, before + sum(counts.values())) == before + sum(counts.values())

    with grpc.insecure_channel(cluster.attribution) as channel:
        stub = attribution_pb2_grpc.AttributionStub(channel)
        rewards = stub.GetRewards(
            attribution_pb2.RewardsQuery(adapter_id=f"{TENANT}/alpha"),
            timeout=10,
            metadata=operator(cluster, "attribution"),
        )
    lines = {line.contributor_id: line for line in rewards.lines}
    assert set(lines) == {"alpha-trainer", "alpha-data"}
    # alpha's own request, plus half of every token of the equal-weight mix.
    expected_tokens = counts["a"] + counts["m"] / 2
    for line in lines.values():
        assert line.tokens == pytest.approx(expected_tokens, abs=1e-6)
    trainer, data = float(lines["alpha-trainer"].amount), float(lines["alpha-data"].amount)
    assert trainer > 0 and trainer / data == pytest.approx(0.7 / 0.3, rel=1e-3)


def test_a_cancelled_stream_frees_the_worker_and_bills_only_what_was_produced(cluster: Cluster) -> None:
    before = settled_ledger(cluster)
    prompt = list(range(10, 30))  # token ids: the prompt's length is known exactly
    delivered = 0
    with Client(cluster.gateway, api_key=cluster.api_key) as client:
        stream = client.stream(prompt, adapter=f"{TENANT}/beta", max_new_tokens=400, ignore_eos=True)
        for chunk in stream:
            delivered += len(chunk.token_ids)
            if delivered >= 3:
                break
        stream.close()  # the client hangs up mid-generation

    eventually(lambda: worker_idle(cluster))
    billed = settled_ledger(cluster) - before
    completion = billed - len(prompt)
    # Tokens already on the wire when the cancel arrived are billed too: they were produced and sent.
    assert delivered <= completion <= delivered + ON_THE_WIRE, (delivered, completion)
    assert completion < 400


def test_one_request_is_one_trace_across_gateway_worker_store_and_attribution(
    cluster: Cluster, otlp: OtlpReceiver
) -> None:
    request_id = f"trace-{uuid.uuid4().hex[:8]}"
    with Client(cluster.gateway, api_key=cluster.api_key) as client:  # gamma is cold: never used before
        client.generate("Trace me", adapter=f"{TENANT}/gamma", max_new_tokens=4, request_id=request_id)

    def trace_of_request() -> str | None:
        for received in otlp.spans():
            attributes = {a.key: a.value.string_value for a in received.span.attributes}
            if received.service == "openlora-worker" and attributes.get("openlora.request_id") == request_id:
                return received.trace_id
        return None

    trace_id = eventually(trace_of_request)
    wanted = {"openlora-gateway", "openlora-worker", "openlora-store", "openlora-attribution"}

    def services_in_trace() -> set[str] | None:
        found = {s.service for s in otlp.spans() if s.trace_id == trace_id}
        return found if wanted <= found else None

    services = eventually(services_in_trace)
    names = {(s.service, s.span.name) for s in otlp.spans() if s.trace_id == trace_id}
    assert services == wanted, names
    assert ("openlora-worker", "adapter.load") in names and ("openlora-attribution", "ledger.write") in names


@dataclass
class Planned:
    request_id: str
    prompt: str | list[int]
    options: dict[str, Any]
    cancel_after: int | None = None
    """Tokens read before the client hangs up; None reads the stream to its end."""


@dataclass
class Delivered:
    prompt_tokens: int  # the final chunk's usage; a cancelled stream's prompt is token ids of known length
    completion_tokens: int  # token ids the client read
    finish_reason: str | None = None
    text: str = ""
    usage_completion_tokens: int = 0  # what the final chunk's usage said


async def deliver(client: AsyncClient, plan: Planned) -> Delivered:
    got = Delivered(len(plan.prompt) if isinstance(plan.prompt, list) else 0, 0)
    stream = client.stream(plan.prompt, request_id=plan.request_id, **plan.options)
    async with contextlib.aclosing(stream) as chunks:  # leaving early cancels the call
        async for chunk in chunks:
            got.completion_tokens += len(chunk.token_ids)
            got.text += chunk.text
            if chunk.finish_reason is not None:
                got.finish_reason = chunk.finish_reason
                got.prompt_tokens, got.usage_completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
            if plan.cancel_after is not None and got.completion_tokens >= plan.cancel_after:
                break
    return got


async def deliver_all(cluster: Cluster, plans: list[Planned]) -> list[Delivered]:
    async with AsyncClient(cluster.gateway, api_key=cluster.api_key, timeout_s=120) as client:
        return await asyncio.gather(*(deliver(client, plan) for plan in plans))


def usage_by_request(cluster: Cluster, request_ids: list[str]) -> dict[str, tuple[int, int]]:
    """Attribution's (prompt, completion) totals per client request id."""
    with grpc.insecure_channel(cluster.attribution) as channel:
        stub = attribution_pb2_grpc.AttributionStub(channel)
        totals = {}
        for request_id in request_ids:
            report = stub.GetUsage(
                attribution_pb2.UsageQuery(request_id=request_id),
                timeout=10,
                metadata=operator(cluster, "attribution"),
            )
            totals[request_id] = (int(report.totals.prompt_tokens), int(report.totals.completion_tokens))
    return totals


def ledger_ranges(url: str, request_ids: list[str]) -> dict[str, dict[int, list[tuple[int, int]]]]:
    """Per client request id, kind → its rows' (token_index, token_count), in index order. Asserts
    that every row of one client id belongs to one served request, of this tenant."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    UsageEvent.client_request_id,
                    UsageEvent.request_id,
                    UsageEvent.tenant,
                    UsageEvent.kind,
                    UsageEvent.token_index,
                    UsageEvent.token_count,
                )
                .where(UsageEvent.client_request_id.in_(request_ids))
                .order_by(UsageEvent.client_request_id, UsageEvent.kind, UsageEvent.token_index)
            ).all()
    finally:
        engine.dispose()
    ranges: dict[str, dict[int, list[tuple[int, int]]]] = {}
    served: dict[str, set[str]] = {}
    for client_id, usage_id, tenant, kind, index, count in rows:
        assert tenant == TENANT, (client_id, tenant)
        served.setdefault(client_id, set()).add(usage_id)
        ranges.setdefault(client_id, {}).setdefault(int(kind), []).append((int(index), int(count)))
    assert all(len(usage_ids) == 1 for usage_ids in served.values()), served
    return ranges


def tiles(ranges: list[tuple[int, int]], n: int) -> bool:
    """The ranges [index, index + count) are non-empty, contiguous, non-overlapping and cover [0, n)."""
    end = 0
    for index, count in ranges:
        if index != end or count <= 0:
            return False
        end += count
    return end == n


def stop_string_in(text: str) -> str:
    """Three characters from the middle of `text` (whole characters, none a placeholder)."""
    for start in range(len(text) // 3, len(text) - 3):
        candidate = text[start : start + 3]
        if "\ufffd" not in candidate and candidate.strip():
            return candidate
    raise AssertionError(f"no stop string to take from {text!r}")


def test_usage_totals_by_range_equal_the_tokens_streamed_to_the_token(
    cluster: Cluster, database_url: str
) -> None:
    run = uuid.uuid4().hex[:8]
    alpha, beta, gamma = (f"{TENANT}/{name}" for name in ("alpha", "beta", "gamma"))
    # What greedy alpha writes for this prompt: a stop string from its middle ends the same request early.
    stop_prompt = "Write about rivers"
    stop_options: dict[str, Any] = {"adapter": alpha, "max_new_tokens": 48, "ignore_eos": True}
    with Client(cluster.gateway, api_key=cluster.api_key) as client:
        stop = stop_string_in(client.generate(stop_prompt, **stop_options).text)
    mix = [MixComponent(alpha, 1.0), MixComponent(gamma, 0.5)]
    plans = [
        Planned(f"{run}-alpha", "Tell me about the sea", {"adapter": alpha, "max_new_tokens": 24}),
        Planned(f"{run}-beta", "Tell me about cooking", {"adapter": beta, "max_new_tokens": 7}),
        Planned(f"{run}-gamma", "Once upon a time", {"adapter": gamma, "max_new_tokens": 40}),
        Planned(f"{run}-base", "Hello there", {"max_new_tokens": 13}),
        Planned(f"{run}-mix", "Tell me about both", {"mix": mix, "max_new_tokens": 31}),
        Planned(
            f"{run}-mix-ties",
            "Both again",
            {"mix": mix, "strategy": "ties", "density": 0.5, "max_new_tokens": 5},
        ),
        Planned(f"{run}-long", "A long story", {"adapter": beta, "max_new_tokens": 96}),
        Planned(f"{run}-eos", "Maybe short", {"adapter": gamma, "max_new_tokens": 20, "ignore_eos": False}),
        Planned(f"{run}-stop", stop_prompt, stop_options | {"stop": [stop]}),
        Planned(
            f"{run}-cancel",
            list(range(40, 57)),
            {"adapter": beta, "max_new_tokens": 400},
            cancel_after=3,
        ),
    ]
    for plan in plans:
        plan.options.setdefault("ignore_eos", True)
    delivered = dict(
        zip((p.request_id for p in plans), asyncio.run(deliver_all(cluster, plans)), strict=True)
    )

    cancelled = f"{run}-cancel"
    for plan in plans:
        got = delivered[plan.request_id]
        if plan.request_id == cancelled:
            assert got.finish_reason is None and got.completion_tokens >= 3
            continue
        # The final chunk's usage is the stream's own count: every token it carried, no more.
        assert got.finish_reason is not None, plan.request_id
        assert got.prompt_tokens > 0 and got.usage_completion_tokens == got.completion_tokens, plan.request_id
        if plan.options.get("ignore_eos"):
            expected_finish = "stop" if "stop" in plan.options else "length"
            assert got.finish_reason == expected_finish, (plan.request_id, got.finish_reason)
    stopped = delivered[f"{run}-stop"]
    assert stop not in stopped.text and 0 < stopped.completion_tokens < 48

    # (a) Attribution's totals per client request id, once usage stopped arriving.
    eventually(lambda: worker_idle(cluster))
    ids = [p.request_id for p in plans]
    exact = {r: (d.prompt_tokens, d.completion_tokens) for r, d in delivered.items() if r != cancelled}

    totals = steady(
        lambda: usage_by_request(cluster, ids),
        lambda now: all(now[r] == want for r, want in exact.items()) and now[cancelled][0] > 0,
    )
    assert {r: totals[r] for r in exact} == exact
    billed_prompt, billed_completion = totals[cancelled]
    read = delivered[cancelled].completion_tokens
    assert billed_prompt == delivered[cancelled].prompt_tokens
    # Tokens already on the wire when the cancel arrived are billed too: they were produced and sent.
    assert read <= billed_completion <= read + ON_THE_WIRE, (read, billed_completion)

    # (b) In the ledger itself: each request's rows of each kind tile its tokens, no gap, no overlap.
    ranges = ledger_ranges(database_url, ids)
    prompt, completion = int(attribution_pb2.PROMPT), int(attribution_pb2.COMPLETION)
    for request_id in ids:
        want_prompt, want_completion = totals[request_id]
        kinds = ranges.get(request_id, {})
        assert set(kinds) == {prompt, completion}, (request_id, kinds)
        assert tiles(kinds[prompt], want_prompt), (request_id, want_prompt, kinds[prompt])
        assert tiles(kinds[completion], want_completion), (request_id, want_completion, kinds[completion])
