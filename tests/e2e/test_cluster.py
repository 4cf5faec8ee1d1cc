"""The whole cluster as real processes on PostgreSQL and SeaweedFS (tiny model), driven like a tenant
would: upload through the gateway, generate (an adapter, a mix, a cancelled stream), then check the
ledger, the rewards and one request's trace across every service."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from services.adapter_store.client import adapter_files, upload
from services.client import Client, MixComponent
from services.cluster.up import Cluster, ClusterConfig
from services.common.proto import adapter_store_pb2 as store_pb
from services.common.proto import (
    adapter_store_pb2_grpc,
    attribution_pb2,
    attribution_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
)
from services.common.synthetic_adapters import write_adapter
from tests.e2e.cluster_kit import running_cluster
from tests.kit.otlp_receiver import OtlpReceiver
from tests.kit.postgres import create_database, drop_database
from tests.kit.seaweedfs import S3Endpoint

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = "e2e"
T = TypeVar("T")


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def cluster(
    s3_server: S3Endpoint, otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    bucket = f"e2e-{uuid.uuid4().hex[:10]}"
    s3_server.client().create_bucket(Bucket=bucket)
    database_url = create_database("openlora_e2e")
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
        database_url=database_url,
        tenant=TENANT,
    )
    try:
        with running_cluster(config, env) as (running, _logs):
            for name, seed in (("alpha", 1), ("beta", 2), ("gamma", 3)):
                asyncio.run(upload_adapter(running, name, seed, tmp_path_factory.mktemp(name)))
            yield running
    finally:
        drop_database(database_url)


async def upload_adapter(cluster: Cluster, name: str, seed: int, folder: Path) -> None:
    """Through the gateway's store API, as the tenant: trainer 70%, data contributor 30%."""
    import json

    config = json.loads((cluster.model_dir / "config.json").read_text())
    path = write_adapter(folder, config, rank=4, targets=["q_proj", "v_proj"], seed=seed, std=0.1)
    header = store_pb.UploadHeader(
        id=f"{TENANT}/{name}",
        visibility=store_pb.PRIVATE,
        base_model=cluster.base_model,
        provenance=store_pb.Provenance(
            trainer=f"{name}-trainer",
            datasets=[f"{name}-data"],
            contributors=[
                store_pb.Contributor(id=f"{name}-trainer", role=store_pb.TRAINER, share=0.7),
                store_pb.Contributor(id=f"{name}-data", role=store_pb.DATA, share=0.3),
            ],
        ),
    )
    async with grpc.aio.insecure_channel(cluster.gateway) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        auth = (("authorization", f"Bearer {cluster.api_key}"),)
        info = await upload(stub, header, adapter_files(path), timeout=60, metadata=auth)
    assert info.owner == TENANT


def eventually(probe: Callable[[], T | None], timeout_s: float = 30.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.25)


def ledger_tokens(cluster: Cluster) -> int:
    with grpc.insecure_channel(cluster.attribution) as channel:
        report = attribution_pb2_grpc.AttributionStub(channel).GetUsage(
            attribution_pb2.UsageQuery(tenant=TENANT), timeout=10
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
        rewards = stub.GetRewards(attribution_pb2.RewardsQuery(adapter_id=f"{TENANT}/alpha"), timeout=10)
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

    def worker_idle() -> bool | None:
        with grpc.insecure_channel(cluster.workers[0]) as channel:
            reply = inference_pb2_grpc.InferenceStub(channel).ListModels(
                inference_pb2.ListModelsRequest(), timeout=10
            )
        idle = reply.stats.running_requests == 0 and reply.stats.kv_blocks_used == 0
        return True if idle else None

    eventually(worker_idle)
    billed = settled_ledger(cluster) - before
    completion = billed - len(prompt)
    # Tokens already on the wire when the cancel arrived are billed too: they were produced and sent.
    assert delivered <= completion <= delivered + 8, (delivered, completion)
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
