"""Provenance asked from the adapter store (`AdapterStore.Get`), once per version, on PostgreSQL and
SQLite. The store here is a minimal servicer of the real contract, served by the real server kit:
it answers Get from a dict, which is all the attribution service may rely on."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import grpc
import pytest
from openlora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, attribution_pb2, attribution_pb2_grpc

from services.attribution.app import AttributionApp, build
from services.common.errors import NotFound
from services.common.grpc_client import open_channel
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.settings import ServiceSettings
from tests.integration.attribution.wire import (
    attribution_settings,
    batch,
    provenance,
    register,
    request_tokens,
)
from tests.kit.service_auth import trusted

TRAINER, DATA = adapter_store_pb2.TRAINER, adapter_store_pb2.DATA


class CatalogOnlyStore(adapter_store_pb2_grpc.AdapterStoreServicer):
    """Answers `Get` from `versions` (id → list of versions, newest last); counts the calls."""

    def __init__(self) -> None:
        self.versions: dict[str, list[adapter_store_pb2.AdapterInfo]] = {}
        self.calls: list[tuple[str, str]] = []

    def add(self, adapter_id: str, version: str, prov: adapter_store_pb2.Provenance) -> None:
        info = adapter_store_pb2.AdapterInfo(id=adapter_id, version=version, provenance=prov)
        self.versions.setdefault(adapter_id, []).append(info)

    async def Get(
        self, request: adapter_store_pb2.GetAdapterRequest, context: Any
    ) -> adapter_store_pb2.AdapterInfo:
        self.calls.append((request.adapter.id, request.adapter.version))
        for info in reversed(self.versions.get(request.adapter.id, [])):
            if request.adapter.version in ("", info.version):
                return info
        raise NotFound(f"adapter {request.adapter.id} not found")


@pytest.fixture
async def store() -> AsyncIterator[tuple[GrpcServer, CatalogOnlyStore]]:
    catalog = CatalogOnlyStore()  # type: ignore[abstract]  # the base answers UNIMPLEMENTED for the rest
    binding = ServiceBinding(
        "openlora.v1.AdapterStore",
        lambda s: adapter_store_pb2_grpc.add_AdapterStoreServicer_to_server(catalog, s),
    )
    server = GrpcServer(ServiceSettings(port=0), [binding], component="store")
    await server.start()
    yield server, catalog
    await server.stop()


@pytest.fixture
async def with_store(
    ledger_url: str, store: tuple[GrpcServer, CatalogOnlyStore]
) -> AsyncIterator[tuple[AttributionApp, attribution_pb2_grpc.AttributionAsyncStub]]:
    settings = attribution_settings(
        ledger_url, store_address=f"127.0.0.1:{store[0].port}", store_timeout_s=2.0
    )
    built = build(settings)
    try:
        await built.start()
        async with open_channel(f"127.0.0.1:{built.server.port}", **trusted("attribution")) as channel:
            yield built, attribution_pb2_grpc.AttributionStub(channel)
    finally:
        await built.close()


async def test_store_provenance_is_fetched_once_per_version_and_credited(
    store: tuple[GrpcServer, CatalogOnlyStore],
    with_store: tuple[AttributionApp, attribution_pb2_grpc.AttributionAsyncStub],
) -> None:
    _, catalog = store
    _, stub = with_store
    catalog.add("alpha", "v1", provenance(("alice", TRAINER, 0.75), ("bob", DATA, 0.25)))
    catalog.add("alpha", "v2", provenance(("carol", TRAINER, 1.0)))
    await stub.SetPrice(
        attribution_pb2.SetPriceRequest(adapter_id="alpha", prompt_price="0", completion_price="0.01")
    )
    await stub.RecordUsage(
        iter(
            [
                batch(1, request_tokens("r1", 0, 4, adapters=(("alpha", "v1", 1.0),))),
                batch(2, request_tokens("r2", 0, 4, adapters=(("alpha", "v1", 1.0),))),
                batch(3, request_tokens("r3", 0, 2, adapters=(("alpha", "", 1.0),))),  # latest = v2
            ]
        )
    )
    assert catalog.calls == [("alpha", "v1"), ("alpha", "")]
    alice = await stub.GetRewards(attribution_pb2.RewardsQuery(contributor_id="alice"))
    assert Decimal(alice.total) == Decimal("0.06")  # 8 × 0.01 × 0.75
    carol = await stub.GetRewards(attribution_pb2.RewardsQuery(contributor_id="carol"))
    assert Decimal(carol.total) == Decimal("0.02")


async def test_pushed_provenance_wins_and_spares_the_store(
    store: tuple[GrpcServer, CatalogOnlyStore],
    with_store: tuple[AttributionApp, attribution_pb2_grpc.AttributionAsyncStub],
) -> None:
    _, catalog = store
    _, stub = with_store
    catalog.add("alpha", "v1", provenance(("alice", TRAINER, 1.0)))
    await stub.RegisterProvenance(register("alpha", "v1", provenance(("dave", TRAINER, 1.0))))
    await stub.RecordUsage(iter([batch(1, request_tokens("r", 0, 3, adapters=(("alpha", "v1", 1.0),)))]))
    assert catalog.calls == []
    report = await stub.GetRewards(attribution_pb2.RewardsQuery(adapter_id="alpha"))
    assert [line.contributor_id for line in report.lines] == ["dave"]


async def test_adapter_unknown_to_the_store_is_unattributed(
    with_store: tuple[AttributionApp, attribution_pb2_grpc.AttributionAsyncStub],
) -> None:
    _, stub = with_store
    await stub.RecordUsage(iter([batch(1, request_tokens("r", 0, 3, adapters=(("ghost", "v1", 1.0),)))]))
    report = await stub.GetRewards(attribution_pb2.RewardsQuery(adapter_id="ghost"))
    assert [line.contributor_id for line in report.lines] == [""]
    assert Decimal(report.total) == Decimal("0.0000045")  # 3 × the default completion price


async def test_store_down_refuses_the_batch_unavailable_and_writes_nothing(
    store: tuple[GrpcServer, CatalogOnlyStore],
    with_store: tuple[AttributionApp, attribution_pb2_grpc.AttributionAsyncStub],
) -> None:
    server, _ = store
    _, stub = with_store
    await server.stop()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RecordUsage(iter([batch(1, request_tokens("r", 0, 3, adapters=(("alpha", "v1", 1.0),)))]))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    usage = await stub.GetUsage(attribution_pb2.UsageQuery())
    assert usage.totals.completion_tokens == 0
