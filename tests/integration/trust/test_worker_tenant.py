"""A worker believes the tenant a request names only from the gateway; anyone else's request is
billed to its default tenant or refused before a token is made. Real worker (tiny model) and a real
attribution ledger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from openlora.v1 import attribution_pb2, attribution_pb2_grpc, inference_pb2, inference_pb2_grpc

from services.attribution.app import AttributionApp, build
from services.common.grpc_client import open_channel
from services.common.trust.roles import OPERATOR
from tests.integration.attribution.wire import attribution_settings
from tests.integration.worker.kit import WorkerUnderTest, collect, request, worker_settings
from tests.kit.service_auth import as_role, trusted


@dataclass
class Served:
    worker: WorkerUnderTest
    attribution: AttributionApp


@pytest.fixture
async def served(tmp_path: Path, tiny_llama_dir: Path) -> AsyncIterator[Served]:
    attribution = build(attribution_settings(f"sqlite:///{tmp_path / 'ledger.sqlite3'}", grace_period_s=1.0))
    await attribution.start()
    settings = worker_settings(
        tmp_path,
        tiny_llama_dir,
        attribution_address=f"127.0.0.1:{attribution.server.port}",
        default_tenant="solo",
        usage_flush_interval_s=0.1,
    )
    worker = await WorkerUnderTest.start(settings)
    try:
        yield Served(worker, attribution)
    finally:
        await worker.stop()
        await attribution.close()


async def billed(served: Served, request_id: str) -> dict[str, int]:
    """Completion tokens the ledger holds for `request_id`, by tenant."""
    async with open_channel(
        f"127.0.0.1:{served.attribution.server.port}", **trusted("attribution")
    ) as channel:
        stub = attribution_pb2_grpc.AttributionStub(channel)
        totals = {}
        for tenant in ("acme", "solo"):
            report = await stub.GetUsage(attribution_pb2.UsageQuery(request_id=request_id, tenant=tenant))
            totals[tenant] = int(report.totals.completion_tokens)
        return totals


async def test_the_gateway_names_the_tenant_and_an_operator_is_billed_to_the_default(served: Served) -> None:
    port = served.worker.port
    async with open_channel(f"127.0.0.1:{port}", **as_role(OPERATOR, "worker")) as channel:
        operator = inference_pb2_grpc.InferenceStub(channel)
        direct = await collect(operator, request([5, 6, 7], max_new_tokens=4, request_id="direct", tenant=""))
        assert direct.completion_tokens == 4
        # Naming a tenant is the gateway's alone, even the default one's neighbour.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(operator, request([5, 6, 7], max_new_tokens=4, request_id="forged", tenant="acme"))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only the gateway may name the tenant" in (refused.value.details() or "")
    via_gateway = await collect(
        served.worker.stub, request([5, 6, 7], max_new_tokens=3, request_id="relayed", tenant="acme")
    )
    assert via_gateway.completion_tokens == 3

    for request_id, want in (("direct", {"acme": 0, "solo": 4}), ("relayed", {"acme": 3, "solo": 0})):
        got = await billed(served, request_id)
        deadline = asyncio.get_running_loop().time() + 30
        while got != want and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            got = await billed(served, request_id)
        assert got == want, request_id
    assert (await billed(served, "forged")) == {"acme": 0, "solo": 0}


async def test_without_a_default_tenant_a_direct_request_is_refused_before_any_token(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    worker = await WorkerUnderTest.start(worker_settings(tmp_path, tiny_llama_dir))
    try:
        async with open_channel(f"127.0.0.1:{worker.port}", **as_role(OPERATOR, "worker")) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await collect(inference_pb2_grpc.InferenceStub(channel), request([5, 6], tenant=""))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "OPENLORA_WORKER_DEFAULT_TENANT" in (refused.value.details() or "")
        stats = (await worker.stub.ListModels(inference_pb2.ListModelsRequest())).stats
        assert stats.running_requests == 0 and stats.kv_blocks_used == 0
    finally:
        await worker.stop()
