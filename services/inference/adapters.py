"""Turning a request's adapter or mix into an adapter the engine can serve, checked and pinned.

The adapter is loaded (`await cache.get`) before the request reaches the engine, so an unknown,
corrupt or unreachable adapter fails the call with its own status instead of leaving the request
waiting in the engine. It is then checked against the LoRA slots (rank, target modules, shapes: an
adapter trained for another base model does not fit) and pinned in host RAM until the request ends,
so the engine never has to reload it (a mix could not be reloaded from the store at all). Last,
its weights are handed to the engine process as a mapped file (see `engine_process/handoff.py`),
written once per adapter and kept while the adapter stays in host RAM.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry import trace

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.inference.adapter_cache import AdapterCache, AdapterKey, CacheEntry, LoadedAdapter
from services.inference.adapter_cache.mixing import MixSpec
from services.inference.base_model_guard import BaseModelGuard
from services.inference.engine_process.handoff import HandoffWriter
from services.inference.engine_process.protocol import AdapterHandle, PoolShape, SlotState
from services.inference.usage.records import Component

_PIN_ATTEMPTS = 3  # an adapter evicted between its load and its pin is loaded again


@dataclass(frozen=True)
class ResolvedAdapter:
    """An adapter pinned in host RAM for one request; `release()` it when the request ends."""

    key: str  # the engine's adapter key
    components: tuple[Component, ...]  # what usage credits, with each component's share
    tier: str  # where it was found: device, host, disk, store (or mix)
    cache: AdapterCache
    handle: AdapterHandle  # where the engine process reads its weights

    def release(self) -> None:
        self.cache.unpin(self.key)


class AdapterResolver:
    def __init__(
        self,
        cache: AdapterCache | None,
        pool: PoolShape | None,
        tracer: trace.Tracer,
        *,
        handoff: HandoffWriter | None = None,
        slots: Callable[[], SlotState] = SlotState,
        base_model_guard: BaseModelGuard | None = None,
    ) -> None:
        """`pool` is the engine's LoRA slots' shape, `slots()` their state as last reported."""
        self.cache = cache
        self.pool = pool
        self.tracer = tracer
        self.handoff = handoff
        self.slots = slots
        self.base_model_guard = base_model_guard
        # Adapters that passed `check`: a loaded adapter never changes, and checking every weight's shape
        # (120 on SmolLM2: 68 µs) for each of its requests cost more than building its usage records.
        self._checked: weakref.WeakSet[LoadedAdapter] = weakref.WeakSet()

    async def resolve(self, adapter: AdapterKey | None, mix: MixSpec | None) -> ResolvedAdapter | None:
        """None for the base model; else the adapter, loaded, checked and pinned. Raises ServiceError."""
        if adapter is None and mix is None:
            return None
        field = "adapter_ref" if adapter is not None else "mix"
        if self.cache is None or self.pool is None or self.handoff is None:
            raise FailedPrecondition(
                f"{field}: this worker serves the base model only (no adapter store or no LoRA slots)"
            )
        cache = self.cache
        with self.tracer.start_as_current_span("adapter.load") as span:
            started = time.perf_counter()
            for _ in range(_PIN_ATTEMPTS):
                if adapter is not None:
                    entry = await cache.get(adapter)
                else:
                    assert mix is not None
                    entry = await cache.get_mix(mix, max_rank=self.pool.r_max, field="mix")
                loaded = entry.adapter
                if loaded not in self._checked:
                    self.check(loaded, field)
                    self._checked.add(loaded)
                if self.base_model_guard is not None:
                    await self.base_model_guard.check(loaded.components, field)
                if cache.pin(loaded.key) is not None:
                    break
            else:
                raise FailedPrecondition(f"{field}: the adapter cache is too small to hold {loaded.key}")
            tier = self._tier(entry)
            span.set_attributes(
                {
                    "openlora.adapter.key": loaded.key,
                    "openlora.adapter.rank": loaded.rank,
                    "openlora.cache.tier": tier,
                    "openlora.adapter.load_seconds": time.perf_counter() - started,
                }
            )
        try:
            handle = await self._hand_off(loaded)
        except BaseException:
            cache.unpin(loaded.key)
            raise
        return ResolvedAdapter(loaded.key, loaded.components, tier, cache, handle)

    async def _hand_off(self, loaded: LoadedAdapter) -> AdapterHandle:
        assert self.handoff is not None and self.cache is not None
        handle = self.handoff.published(loaded.key)
        if handle is not None:
            return handle
        try:
            handle = await asyncio.to_thread(
                self.handoff.publish, loaded.key, loaded.weights, loaded.rank, loaded.scaling
            )
        except OSError as exc:
            raise Unavailable(
                f"could not hand adapter {loaded.key} to the engine ({exc}); is the handoff directory full?",
                retry_after_s=1.0,
            ) from exc
        host = self.cache.host
        self.handoff.sweep(lambda key: key in host)  # files of adapters the host tier let go
        return handle

    def _tier(self, entry: CacheEntry) -> str:
        """Where the request found its adapter: the tier of a load that finished while it waited
        (joined loads included); otherwise it was in RAM, maybe in a slot already."""
        if entry.tier != "host":
            return entry.tier
        return "device" if self.slots().slot_of(entry.adapter.key) is not None else "host"

    def check(self, adapter: LoadedAdapter, field: str) -> None:
        """Refuse an adapter the LoRA slots cannot hold: too large a rank, other modules, other shapes."""
        assert self.pool is not None
        if adapter.rank > self.pool.r_max:
            raise InvalidArgument(
                field,
                f"adapter {adapter.key} has rank {adapter.rank}; "
                f"this worker serves ranks up to {self.pool.r_max}",
            )
        for path, (lora_a, lora_b) in adapter.weights.items():
            shape = self.pool.layers.get(path)
            if shape is None:
                raise InvalidArgument(
                    field,
                    f"adapter {adapter.key} targets {path}, which this worker's base model does not have "
                    f"or does not serve (LoRA targets: {', '.join(sorted(self.pool.target_modules))})",
                )
            d_in, d_out = shape
            if lora_a.shape[1] != d_in or lora_b.shape[0] != d_out:
                raise InvalidArgument(
                    field,
                    f"adapter {adapter.key} was trained for another base model: {path} has "
                    f"[{lora_b.shape[0]} x {lora_a.shape[1]}] weights, this model's are [{d_out} x {d_in}]",
                )
