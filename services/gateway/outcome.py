"""Counting each public call by tenant, method and the status it ended with."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import grpc

from services.common.errors import ServiceError
from services.gateway.metrics import GatewayMetrics

UNAUTHENTICATED_TENANT = "-"


class CallOutcome:
    """`with CallOutcome(...) as call:` — set `call.tenant` once known; the status is read on exit."""

    def __init__(self, metrics: GatewayMetrics, method: str, context: Any) -> None:
        self.metrics = metrics
        self.method = method
        self.context = context
        self.tenant = UNAUTHENTICATED_TENANT

    def __enter__(self) -> CallOutcome:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.metrics.requests.labels(self.tenant, self.method, _code(exc, self.context).name).inc()


def _code(exc: BaseException | None, context: Any) -> grpc.StatusCode:
    if exc is None:
        return grpc.StatusCode.OK
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.INTERNAL
