"""Per-tenant limits: streams open at once, and tokens per minute as a token bucket.

The bucket holds up to one minute of tokens and refills continuously. A request is admitted while
the bucket is not empty; the tokens it actually uses (prompt and completion, counted as chunks are
relayed) are taken out afterwards, so the bucket can go negative after a long generation and the
tenant then waits until it refills. Plain Python over numbers: unit-tested with a fake clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import ResourceExhausted
from services.gateway.keys import TenantLimits

# A tenant at its stream limit learns nothing about when a stream ends; this is a polite pause.
STREAM_LIMIT_RETRY_S = 1.0


@dataclass
class _TenantState:
    open_streams: int = 0
    tokens: float = 0.0  # bucket level; starts full (set on first use)
    refilled_at: float = 0.0
    fresh: bool = True


@dataclass
class Lease:
    """One admitted stream: charge it the tokens it uses, release it when the stream ends."""

    limiter: TenantLimiter
    tenant: str
    released: bool = field(default=False)

    def charge(self, tokens: int) -> None:
        if tokens > 0:
            self.limiter._charge(self.tenant, tokens)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.limiter._release(self.tenant)


class TenantLimiter:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._tenants: dict[str, _TenantState] = {}
        self._limits: dict[str, TenantLimits] = {}

    def open_streams(self, tenant: str) -> int:
        state = self._tenants.get(tenant)
        return state.open_streams if state else 0

    def admit(self, tenant: str, limits: TenantLimits) -> Lease:
        """A lease for one more stream, or ResourceExhausted with a retry hint."""
        state = self._tenants.setdefault(tenant, _TenantState())
        self._limits[tenant] = limits
        if state.open_streams >= limits.max_concurrent_streams:
            raise ResourceExhausted(
                f"tenant {tenant!r} has {state.open_streams} streams open, its limit; "
                "retry when one has finished",
                retry_after_s=STREAM_LIMIT_RETRY_S,
            )
        if limits.tokens_per_minute:
            self._refill(state, limits.tokens_per_minute)
            if state.tokens < 1:
                per_second = limits.tokens_per_minute / 60.0
                raise ResourceExhausted(
                    f"tenant {tenant!r} is over its limit of {limits.tokens_per_minute} tokens per minute",
                    retry_after_s=round((1 - state.tokens) / per_second, 3),
                )
        state.open_streams += 1
        return Lease(self, tenant)

    def _refill(self, state: _TenantState, per_minute: int) -> None:
        now = self.clock()
        if state.fresh:
            state.tokens, state.fresh = float(per_minute), False
        else:
            state.tokens = min(
                float(per_minute), state.tokens + (now - state.refilled_at) * per_minute / 60.0
            )
        state.refilled_at = now

    def _charge(self, tenant: str, tokens: int) -> None:
        limits = self._limits.get(tenant)
        if limits is None or not limits.tokens_per_minute:
            return
        state = self._tenants[tenant]
        self._refill(state, limits.tokens_per_minute)
        state.tokens -= tokens

    def _release(self, tenant: str) -> None:
        state = self._tenants[tenant]
        state.open_streams -= 1
