from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import common_pb2, inference_pb2

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.gateway.access import AdapterAccess

CATALOG = {
    "shared": store_pb.AdapterInfo(id="shared", owner="", visibility=store_pb.PUBLIC),
    "acme/private": store_pb.AdapterInfo(id="acme/private", owner="acme", visibility=store_pb.PRIVATE),
    "acme/unset": store_pb.AdapterInfo(id="acme/unset", owner="acme"),  # unspecified: private
}


class RpcError(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


class Store:
    def __init__(self) -> None:
        self.calls = 0
        self.down = False
        self.delay_s = 0.0

    async def fetch(self, adapter: common_pb2.AdapterRef) -> store_pb.AdapterInfo:
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.down:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
        if adapter.id.startswith("hf://"):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, "adapter.id: not a valid adapter id")
        if adapter.id not in CATALOG:
            raise RpcError(grpc.StatusCode.NOT_FOUND, "not found")
        return CATALOG[adapter.id]


def request(*adapters: str, mix: bool = False) -> inference_pb2.GenerateRequest:
    message = inference_pb2.GenerateRequest(text="hi")
    if mix:
        for adapter in adapters:
            message.mix.components.add(adapter=common_pb2.AdapterRef(id=adapter), weight=1)
    elif adapters:
        message.adapter_ref.id = adapters[0]
    return message


async def refusal(access: AdapterAccess, tenant: str, message: inference_pb2.GenerateRequest) -> Any:
    with pytest.raises((NotFound, InvalidArgument, Unavailable)) as refused:
        await access.check_request(tenant, message)
    return refused.value


async def test_public_adapters_are_everyones_private_ones_their_owners() -> None:
    access = AdapterAccess(Store().fetch, ttl_s=10)
    await access.check_request("globex", request("shared"))
    await access.check_request("acme", request("acme/private"))
    await access.check_request("acme", request())  # base model: nothing to check
    hidden = await refusal(access, "globex", request("acme/private"))
    missing = await refusal(access, "globex", request("acme/nothing"))
    assert isinstance(hidden, NotFound) and isinstance(missing, NotFound)
    # Another tenant's private adapter reads exactly like one that does not exist.
    assert hidden.message.replace("private", "X") == missing.message.replace("nothing", "X")
    assert isinstance(await refusal(access, "globex", request("acme/unset")), NotFound)


async def test_every_component_of_a_mix_is_checked() -> None:
    access = AdapterAccess(Store().fetch, ttl_s=10)
    await access.check_request("acme", request("shared", "acme/private", mix=True))
    assert isinstance(await refusal(access, "globex", request("shared", "acme/private", mix=True)), NotFound)


async def test_bad_ids_name_the_field() -> None:
    access = AdapterAccess(Store().fetch, ttl_s=10)
    bad = await refusal(access, "acme", request("shared", "hf://org/repo", mix=True))
    assert isinstance(bad, InvalidArgument) and bad.field == "mix.components[1].adapter"
    empty = await refusal(access, "acme", request(""))
    assert isinstance(empty, InvalidArgument) and empty.field == "adapter_ref.id"


async def test_answers_are_cached_and_concurrent_lookups_share_one_call() -> None:
    now = [0.0]
    store = Store()
    store.delay_s = 0.05
    access = AdapterAccess(store.fetch, ttl_s=10, clock=lambda: now[0])
    await asyncio.gather(*(access.check_request("globex", request("shared")) for _ in range(20)))
    assert store.calls == 1
    await access.check_request("globex", request("shared"))
    assert store.calls == 1
    now[0] = 11
    await access.check_request("globex", request("shared"))
    assert store.calls == 2


async def test_a_store_outage_keeps_known_adapters_serving_and_refuses_unknown_ones() -> None:
    now = [0.0]
    store = Store()
    access = AdapterAccess(store.fetch, ttl_s=1, clock=lambda: now[0])
    await access.check_request("acme", request("acme/private"))
    store.down = True
    now[0] = 5
    await access.check_request("acme", request("acme/private"))  # stale answer, still right
    assert isinstance(await refusal(access, "globex", request("acme/private")), NotFound)
    unknown = await refusal(access, "acme", request("shared"))
    assert isinstance(unknown, Unavailable) and unknown.retry_after_s
