"""Relaying through the gateway: what the worker is sent, what the client gets back, cancellation, load."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from openlora.v1 import inference_pb2

from services.common.grpc_client import open_channel
from services.common.grpc_server import GrpcServer
from services.gateway.worker_link import WorkerLink
from tests.integration.gateway.conftest import PRIVATE_ADAPTER, PUBLIC_ADAPTER, StoreUnderTest
from tests.integration.gateway.fake_worker import FakeWorker, fake_worker_server
from tests.integration.gateway.kit import (
    ACME_KEY,
    GLOBEX_KEY,
    GatewayUnderTest,
    InProcessWorkers,
    bad_field,
    gateway_settings,
    generate,
    generate_request,
    retry_delay_s,
    trailer,
)
from tests.kit.waits import wait_until


async def start(
    tmp_path: Path, workers: InProcessWorkers, store: StoreUnderTest, **overrides: object
) -> GatewayUnderTest:
    settings = gateway_settings(tmp_path, workers.addresses, store_address=store.address, **overrides)
    return await GatewayUnderTest.start(settings, wait_workers=len(workers.addresses))


async def refused(gateway: GatewayUnderTest, **request: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await generate(gateway.stub, generate_request(**request))  # type: ignore[arg-type]
    return error.value


async def test_the_tenant_is_stamped_and_request_context_forwarded(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    gateway = await start(tmp_path, fake_workers, store)
    try:
        request = generate_request(adapter=PRIVATE_ADAPTER, request_id="req-42")
        request.tenant = "globex"  # a client cannot bill someone else
        traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        result = await generate(gateway.stub, request, timeout=20, metadata=[("traceparent", traceparent)])
        assert result.tokens == 4
        (seen,) = [s for w in fake_workers.workers for s in w.seen]
        assert (seen.tenant, seen.request_id) == ("acme", "req-42")
        assert seen.metadata["x-request-id"] == "req-42"
        assert seen.metadata["traceparent"] == traceparent
        assert "authorization" not in seen.metadata  # the key stays at the gateway
        # The deadline travels. grpc rounds a timeout up when it encodes it (19.99 s goes out as 20 S),
        # and the gateway's server then counts from the call's arrival, so a little over 20 is right.
        assert seen.time_remaining is not None and 15 < seen.time_remaining <= 21
        assert seen.relayed  # over the worker's relay call, not a call of its own

        await generate(gateway.stub, generate_request(adapter=PUBLIC_ADAPTER), key=GLOBEX_KEY)
        (unnamed,) = [s for w in fake_workers.workers for s in w.seen if s.request_id != "req-42"]
        assert unnamed.tenant == "globex" and len(unnamed.request_id) >= 16  # an id was assigned
    finally:
        await gateway.stop()


async def test_worker_refusals_reach_the_client_with_their_details(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    gateway = await start(tmp_path, fake_workers, store)
    try:
        bad = await refused(gateway, text="invalid")
        assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and "text: refused" in (bad.details() or "")
        assert bad_field(bad) == "text"
        bad_id = await refused(gateway, adapter="Not/A/Valid/Id")
        assert bad_id.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        await gateway.stop()


async def test_list_models_hides_worker_caches(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:

    gateway = await start(tmp_path, fake_workers, store)
    try:
        reply = await gateway.stub.ListModels(
            inference_pb2.ListModelsRequest(), metadata=[("authorization", f"Bearer {ACME_KEY}")]
        )
        assert reply.base_model.name == "fake"
        assert not reply.adapters and not reply.worker_id
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await gateway.stub.ListModels(inference_pb2.ListModelsRequest())
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await gateway.stop()


async def test_a_client_that_hangs_up_cancels_the_worker_call(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    gateway = await start(tmp_path, fake_workers, store)
    try:
        call = gateway.stub.Generate(
            generate_request(max_new_tokens=1000), metadata=[("authorization", f"Bearer {ACME_KEY}")]
        )
        async for _ in call:
            break
        call.cancel()
        await wait_until(
            lambda: sum(w.cancelled for w in fake_workers.workers) > 0, 5, "the worker cancelled"
        )
        assert sum(w.cancelled for w in fake_workers.workers) == 1
        assert all(e.in_flight == 0 for e in gateway.gateway.pool.endpoints.values())
    finally:
        await gateway.stop()


async def test_200_concurrent_streams_finish_without_errors(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    gateway = await start(tmp_path, fake_workers, store, max_concurrent_streams=256)
    try:
        adapters = [PUBLIC_ADAPTER, PRIVATE_ADAPTER, None]
        results = await asyncio.gather(
            *(
                generate(
                    gateway.stub, generate_request(adapter=adapters[i % 3], max_new_tokens=16), timeout=60
                )
                for i in range(200)
            ),
            return_exceptions=True,
        )
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors == []
        assert all(r.tokens == 16 for r in results if not isinstance(r, BaseException))
        # Every stream rode its worker's one relay call.
        assert all(s.relayed for w in fake_workers.workers for s in w.seen)
        assert [e.link.calls_opened for e in gateway.gateway.pool.endpoints.values()] == [1, 1, 1]
        assert (
            gateway.counter("openlora_gateway_requests_total", tenant="acme", method="Generate", code="OK")
            == 200
        )
    finally:
        await gateway.stop()


async def test_a_worker_answering_unavailable_is_retried_elsewhere_but_kept_in_rotation(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    gateway = await start(tmp_path, fake_workers, store)
    try:
        error = await refused(gateway, text="unavailable")
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "failed on 3 worker(s)" in (error.details() or "")
        assert retry_delay_s(error) is not None
        assert [len(w.seen) for w in fake_workers.workers] == [1, 1, 1]
        assert len(gateway.gateway.pool.healthy_loads()) == 3  # alive workers are not taken out
    finally:
        await gateway.stop()


async def test_a_worker_without_the_relay_serves_one_call_per_stream(
    tmp_path: Path, store: StoreUnderTest
) -> None:
    worker = FakeWorker("old")
    server = fake_worker_server(worker, relay=False)
    port = await server.start()
    settings = gateway_settings(tmp_path, [f"127.0.0.1:{port}"], store_address=store.address)
    gateway = await GatewayUnderTest.start(settings, wait_workers=1)
    try:
        results = await asyncio.gather(*(generate(gateway.stub, generate_request()) for _ in range(3)))
        assert [r.tokens for r in results] == [4, 4, 4]
        assert [s.relayed for s in worker.seen] == [False, False, False]
        (endpoint,) = gateway.gateway.pool.endpoints.values()
        assert not endpoint.link.supported
        error = await refused(gateway, text="invalid")  # refusals pass through the same either way
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and bad_field(error) == "text"
    finally:
        await gateway.stop()
        await server.stop()


@contextlib.asynccontextmanager
async def linked(worker: FakeWorker, **settings: Any) -> AsyncIterator[tuple[GrpcServer, WorkerLink]]:
    """`worker` served, and a gateway's link to it."""
    server = fake_worker_server(worker, **settings)
    port = await server.start()
    channel = open_channel(f"127.0.0.1:{port}")
    link = WorkerLink(channel, f"127.0.0.1:{port}")
    try:
        yield server, link
    finally:
        await link.close()
        await channel.close()
        await server.stop()


async def test_a_draining_worker_finishes_relayed_streams_and_refuses_new_ones() -> None:
    worker = FakeWorker("draining", delay_s=0.1)
    async with linked(worker, grace_s=10) as (server, link):
        running = link.stream(generate_request(max_new_tokens=10, request_id="old"), 30.0, {})
        first = await anext(running)
        assert first.completion_tokens == 1
        stopping = server.stop()
        await wait_until(lambda: server.inflight.draining, 5, "the worker draining")
        with pytest.raises(grpc.aio.AioRpcError) as refusal:
            async for _ in link.stream(generate_request(request_id="new"), 30.0, {}):
                pass
        assert refusal.value.code() == grpc.StatusCode.UNAVAILABLE
        assert trailer(refusal.value, "x-request-id") == "new"  # answered: the gateway keeps it in rotation
        rest = [chunk async for chunk in running]  # the stream in flight runs to its end
        assert sum(c.completion_tokens for c in rest) == 9
        await stopping
        assert [s.request_id for s in worker.seen] == ["old"]


async def test_relayed_streams_count_against_the_workers_call_limit() -> None:
    worker = FakeWorker("small", delay_s=0.05)
    async with linked(worker, max_concurrent_rpcs=1) as (_, link):
        running = link.stream(generate_request(max_new_tokens=5), 30.0, {})
        await anext(running)
        with pytest.raises(grpc.aio.AioRpcError) as refusal:
            await anext(link.stream(generate_request(request_id="second"), 30.0, {}))
        assert refusal.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_concurrent_rpcs" in (refusal.value.details() or "")
        assert sum([c.completion_tokens async for c in running]) == 4
