from __future__ import annotations

import pytest

from services.common.errors import ResourceExhausted
from services.gateway.keys import TenantLimits
from services.gateway.limits import TenantLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_streams_are_limited_per_tenant_and_freed_on_release() -> None:
    limiter = TenantLimiter(Clock())
    limits = TenantLimits(max_concurrent_streams=2, tokens_per_minute=0)
    first, _ = limiter.admit("acme", limits), limiter.admit("acme", limits)
    with pytest.raises(ResourceExhausted) as refused:
        limiter.admit("acme", limits)
    assert "2 streams open" in refused.value.message
    assert refused.value.retry_after_s is not None and refused.value.retry_after_s > 0
    limiter.admit("globex", limits)  # another tenant is not affected
    first.release()
    first.release()  # idempotent
    assert limiter.open_streams("acme") == 1
    limiter.admit("acme", limits)


def test_token_bucket_refuses_when_empty_and_tells_when_to_retry() -> None:
    clock = Clock()
    limiter = TenantLimiter(clock)
    limits = TenantLimits(max_concurrent_streams=10, tokens_per_minute=600)  # 10 tokens/s
    lease = limiter.admit("acme", limits)
    lease.charge(650)  # a long generation overdraws the bucket by 50 tokens
    lease.release()
    with pytest.raises(ResourceExhausted) as refused:
        limiter.admit("acme", limits)
    assert refused.value.retry_after_s == pytest.approx(5.1)  # (1 - (-50)) / 10
    clock.now += 5.2
    limiter.admit("acme", limits).release()


def test_bucket_refills_no_higher_than_one_minute_of_tokens() -> None:
    clock = Clock()
    limiter = TenantLimiter(clock)
    limits = TenantLimits(max_concurrent_streams=10, tokens_per_minute=60)
    lease = limiter.admit("acme", limits)
    clock.now += 3600
    lease.charge(60)
    lease.release()
    with pytest.raises(ResourceExhausted):
        limiter.admit("acme", limits)


def test_unlimited_tokens_never_refuse() -> None:
    limiter = TenantLimiter(Clock())
    limits = TenantLimits(max_concurrent_streams=1, tokens_per_minute=0)
    for _ in range(3):
        lease = limiter.admit("acme", limits)
        lease.charge(10**9)
        lease.release()
