"""Who may use which adapter: public adapters are everyone's, private ones their owner's only.

An adapter another tenant keeps private is reported exactly like one that does not exist, so its
existence does not leak. Owner and visibility come from the store (`Get`) and are reused for
`adapter_cache_s`; concurrent lookups of one adapter share one call, and while the store is down
the last answer keeps being used, so adapters already in use keep serving.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import common_pb2, inference_pb2

from services.common.errors import InvalidArgument, NotFound, Unavailable
from services.gateway.upstream import UpstreamError

# Retry hint when the store cannot be asked about an adapter never seen before.
STORE_DOWN_RETRY_S = 2.0


@dataclass(frozen=True)
class Ownership:
    owner: str
    public: bool

    def visible_to(self, tenant: str) -> bool:
        return self.public or self.owner == tenant


def ownership(info: store_pb.AdapterInfo) -> Ownership:
    return Ownership(info.owner, info.visibility == store_pb.PUBLIC)


def hidden(adapter: common_pb2.AdapterRef) -> NotFound:
    """The error for an adapter that does not exist, or is another tenant's private one."""
    if adapter.version:
        return NotFound(f"adapter {adapter.id!r} version {adapter.version!r} not found")
    return NotFound(f"adapter {adapter.id!r} not found")


def requested_adapters(request: inference_pb2.GenerateRequest) -> list[tuple[str, common_pb2.AdapterRef]]:
    """(field name, reference) of every adapter a Generate request uses."""
    kind = request.WhichOneof("adapter")
    if kind == "adapter_ref":
        return [("adapter_ref", request.adapter_ref)]
    if kind == "mix":
        return [(f"mix.components[{i}].adapter", c.adapter) for i, c in enumerate(request.mix.components)]
    return []


Fetch = Callable[[common_pb2.AdapterRef], Awaitable[store_pb.AdapterInfo]]


class AdapterAccess:
    def __init__(self, fetch: Fetch, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.fetch = fetch
        self.ttl_s = ttl_s
        self.clock = clock
        self._known: dict[tuple[str, str], tuple[Ownership, float]] = {}
        self._pending: dict[tuple[str, str], asyncio.Task[Ownership]] = {}

    async def check_request(self, tenant: str, request: inference_pb2.GenerateRequest) -> None:
        """Raise NotFound unless every adapter of the request is visible to `tenant`."""
        for field, adapter in requested_adapters(request):
            if not adapter.id:
                raise InvalidArgument(f"{field}.id", "must not be empty")
            if not (await self.ownership_of(adapter, field)).visible_to(tenant):
                raise hidden(adapter)

    async def ownership_of(self, adapter: common_pb2.AdapterRef, field: str) -> Ownership:
        key = (adapter.id, adapter.version)
        known = self._known.get(key)
        if known is not None and self.clock() - known[1] < self.ttl_s:
            return known[0]
        pending = self._pending.get(key)
        if pending is None:
            # A task of its own, so a caller that hangs up does not cancel the lookup others await.
            pending = asyncio.get_running_loop().create_task(self._lookup(adapter, field, known))
            self._pending[key] = pending
            pending.add_done_callback(lambda task: self._lookup_done(key, task))
        return await asyncio.shield(pending)

    def _lookup_done(self, key: tuple[str, str], task: asyncio.Task[Ownership]) -> None:
        del self._pending[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter re-raises it; nobody else must warn

    async def _lookup(
        self, adapter: common_pb2.AdapterRef, field: str, known: tuple[Ownership, float] | None
    ) -> Ownership:
        try:
            info = await self.fetch(adapter)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.NOT_FOUND:
                self._known.pop((adapter.id, adapter.version), None)
                raise hidden(adapter) from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(field, exc.details() or "invalid adapter reference") from None
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                if known is not None:
                    return known[0]
                raise Unavailable(
                    f"the adapter store is unreachable, so access to {adapter.id!r} cannot be checked",
                    retry_after_s=STORE_DOWN_RETRY_S,
                ) from None
            raise UpstreamError(exc) from None
        result = ownership(info)
        self._known[(adapter.id, adapter.version)] = (result, self.clock())
        return result
