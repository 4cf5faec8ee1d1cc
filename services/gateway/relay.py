"""Relaying one Generate stream to a worker, chunk by chunk, with retries before the first chunk.

A failure before any chunk reached the client is invisible to it: the request goes to the next
worker in the adapter's hash order (at most `max_attempts` workers in all). Once a chunk has been
relayed the stream cannot be resumed elsewhere (the client holds part of an output another worker
would not reproduce under sampling), so a worker failure then ends the call `UNAVAILABLE` naming the
request id. The client's deadline travels as the worker call's timeout; a client that hangs up
cancels the worker call, which frees its KV blocks.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
from openlora.v1 import inference_pb2
from opentelemetry import propagate

from services.common.errors import Unavailable
from services.common.interceptors import REQUEST_ID_KEY
from services.gateway.access import requested_adapters
from services.gateway.limits import Lease
from services.gateway.membership import WorkerEndpoint, WorkerPool
from services.gateway.metrics import GatewayMetrics
from services.gateway.routing import route
from services.gateway.upstream import UpstreamError
from services.gateway.worker_link import Relayed, RelayUnsupported

log = logging.getLogger("openlora.gateway.relay")

# Codes that mean "this worker is down or going away", as opposed to an answer about the request.
_WORKER_DOWN = frozenset({grpc.StatusCode.UNAVAILABLE})
# After the first chunk these are the worker failing; anything else (a deadline, a refusal) is passed on.
_BROKEN_MID_STREAM = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
    }
)
# W3C trace context, forwarded verbatim when the gateway does not trace itself.
_TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
NO_WORKER_RETRY_S = 1.0


def _answered(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the status came from the worker's server (which always returns its request id),
    rather than from the channel failing to reach it."""
    return any(key == REQUEST_ID_KEY for key, _ in exc.trailing_metadata() or ())


def routing_key(request: inference_pb2.GenerateRequest) -> str | None:
    """The adapter id a request is routed by: the adapter, or a mix's first component; None for the base."""
    adapters = requested_adapters(request)
    return adapters[0][1].id if adapters else None


class Relay:
    def __init__(
        self,
        pool: WorkerPool,
        metrics: GatewayMetrics,
        *,
        load_factor: float,
        max_attempts: int,
        forward_trace_headers: bool,
    ) -> None:
        self.pool = pool
        self.metrics = metrics
        self.load_factor = load_factor
        self.max_attempts = max_attempts
        self.forward_trace_headers = forward_trace_headers

    def _forwarded(self, context: Any) -> dict[str, str]:
        return {
            k: v for k, v in context.invocation_metadata() or () if k in _TRACE_HEADERS and isinstance(v, str)
        }

    def _trace_headers(self, context: Any) -> dict[str, str]:
        """The trace context the worker's spans join: the client's, or this gateway's own span."""
        if self.forward_trace_headers:
            return self._forwarded(context)
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        return carrier

    def _metadata(self, context: Any, request_id: str) -> list[tuple[str, str]]:
        """A Generate call's metadata (tracing interceptors, when on, add their own context)."""
        metadata = [(REQUEST_ID_KEY, request_id)]
        if self.forward_trace_headers:
            metadata += self._forwarded(context).items()
        return metadata

    async def generate(
        self, request: inference_pb2.GenerateRequest, context: Any, lease: Lease
    ) -> AsyncIterator[bytes]:
        """Stream `request` (tenant and request id already stamped) from the workers: each chunk
        serialized as the worker sent it."""
        started = time.perf_counter()
        loads = self.pool.healthy_loads()
        if not loads:
            raise Unavailable("no inference worker is available", retry_after_s=NO_WORKER_RETRY_S)
        plan = route(routing_key(request), loads, self.load_factor)
        self.metrics.routing.labels(plan.decision).inc()
        failures: list[str] = []
        for address in plan.order[: self.max_attempts]:
            endpoint = self.pool.get(address)
            if endpoint is None:  # removed from DNS since routing
                continue
            relayed = 0
            try:
                # aclosing: when the client leaves mid-stream the worker call is cancelled now, not at GC.
                async with contextlib.aclosing(self._attempt(endpoint, request, context)) as chunks:
                    async for chunk in chunks:
                        if relayed == 0:
                            self.metrics.ttft.observe(time.perf_counter() - started)
                        relayed += 1
                        lease.charge(chunk.completion_tokens + chunk.prompt_tokens)
                        self._count_tokens(lease.tenant, chunk)
                        yield chunk.data
                return
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if relayed == 0 and code in _WORKER_DOWN:
                    # A worker that answered UNAVAILABLE itself (its store is down, it is draining) is
                    # alive: try elsewhere, but only take it out when the connection itself failed.
                    if not _answered(exc):
                        endpoint.report_failure()
                    failures.append(f"{address}: {exc.details() or code.name}")
                    self.metrics.retries.inc()
                    log.warning("%s on worker %s before the first chunk; trying the next", code.name, address)
                    continue
                if relayed and code in _BROKEN_MID_STREAM:
                    if code in _WORKER_DOWN and not _answered(exc):
                        endpoint.report_failure()
                    self.metrics.broken_streams.inc()
                    raise Unavailable(
                        f"worker failed after {relayed} chunk(s) of request {request.request_id}; "
                        f"the stream cannot be resumed, send the request again ({exc.details() or code.name})"
                    ) from None
                raise UpstreamError(exc) from None
        tried = "; ".join(failures) or "no worker left"
        raise Unavailable(
            f"request {request.request_id} failed on {len(failures)} worker(s): {tried}",
            retry_after_s=NO_WORKER_RETRY_S,
        )

    def _count_tokens(self, tenant: str, chunk: Relayed) -> None:
        completion, prompt = self.metrics.token_counters(tenant)
        if chunk.completion_tokens:
            completion.inc(chunk.completion_tokens)
        if chunk.prompt_tokens:
            prompt.inc(chunk.prompt_tokens)

    async def _attempt(
        self,
        endpoint: WorkerEndpoint,
        request: inference_pb2.GenerateRequest,
        context: Any,
    ) -> AsyncGenerator[Relayed]:
        endpoint.enter()
        try:
            if endpoint.link.supported:
                try:
                    stream = endpoint.link.stream(
                        request, context.time_remaining(), self._trace_headers(context)
                    )
                    async with contextlib.aclosing(stream) as chunks:
                        async for chunk in chunks:
                            yield chunk
                    return
                except RelayUnsupported:
                    log.info("worker %s has no relay service: one call per stream", endpoint.address)
            metadata = self._metadata(context, request.request_id)
            call = endpoint.generate_call(request, timeout=context.time_remaining(), metadata=metadata)
            try:
                async for data in call:
                    yield Relayed.parse(data)
            finally:
                call.cancel()  # a no-op once finished; otherwise the client left, so free the worker
        finally:
            endpoint.leave()
