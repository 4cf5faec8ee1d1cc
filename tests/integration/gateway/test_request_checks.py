"""What attribution would refuse is refused at the gateway, before any worker sees it.

Each of these shapes once passed the gateway and the worker and then stopped the worker's usage
stream at attribution. Now each is INVALID_ARGUMENT naming its field, no worker is called, and an
`x-request-id` header the ledger could not store is replaced rather than passed on.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from openlora.v1 import common_pb2, inference_pb2

from tests.integration.gateway.conftest import PUBLIC_ADAPTER, StoreUnderTest
from tests.integration.gateway.kit import (
    ACME_KEY,
    GatewayUnderTest,
    InProcessWorkers,
    auth,
    bad_field,
    gateway_settings,
    generate,
    generate_request,
)


@pytest.fixture
async def gateway(
    tmp_path: Path, store: StoreUnderTest
) -> AsyncIterator[tuple[GatewayUnderTest, InProcessWorkers]]:
    workers = await InProcessWorkers.start(1)
    settings = gateway_settings(tmp_path, workers.addresses, store_address=store.address)
    started = await GatewayUnderTest.start(settings, wait_workers=1)
    yield started, workers
    await started.stop()
    await workers.stop()


def mixed(*components: tuple[str, str, float]) -> inference_pb2.GenerateRequest:
    request = generate_request()
    for adapter_id, version, weight in components:
        request.mix.components.add(
            adapter=common_pb2.AdapterRef(id=adapter_id, version=version), weight=weight
        )
    return request


def with_id(request_id: str) -> inference_pb2.GenerateRequest:
    return generate_request(request_id=request_id)


POISON = {
    "whitespace in the request id": (with_id("job 42"), "request_id"),
    "a control character in the request id": (with_id("job\x0742"), "request_id"),
    "a request id the ledger cannot hold": (with_id("r" * 129), "request_id"),
    "a weight below the ledger's resolution": (
        mixed((PUBLIC_ADAPTER, "", 1.0), ("other", "", 1e-7)),
        "mix.components[1].weight",
    ),
    "one adapter as latest and by version": (
        mixed((PUBLIC_ADAPTER, "", 1.0), (PUBLIC_ADAPTER, "v20260101000000000-abcdef", 1.0)),
        "mix.components[1].adapter",
    ),
    "an adapter id with whitespace": (generate_request(adapter="a b"), "adapter_ref.id"),
}


@pytest.mark.parametrize("case", list(POISON))
async def test_poison_is_refused_at_the_gateway(
    case: str, gateway: tuple[GatewayUnderTest, InProcessWorkers]
) -> None:
    started, workers = gateway
    request, field = POISON[case]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(started.stub, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert bad_field(caught.value) == field
    assert workers.workers[0].seen == [], "a refused request must not reach a worker"


async def test_a_request_id_header_the_ledger_cannot_hold_is_replaced(
    gateway: tuple[GatewayUnderTest, InProcessWorkers],
) -> None:
    started, workers = gateway
    call = started.stub.Generate(
        generate_request(), metadata=[*auth(ACME_KEY), ("x-request-id", "job 42")], timeout=10
    )
    async for _ in call:
        pass
    (seen,) = workers.workers[0].seen
    assert seen.request_id and " " not in seen.request_id
