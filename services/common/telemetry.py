"""OpenTelemetry bootstrap: a tracer provider per process, exported over OTLP when configured.

The standard OTEL_* environment variables configure the OTLP exporter (endpoint, headers, TLS), so
operators use the same knobs as for any other OpenTelemetry service. gRPC calls are traced by
`opentelemetry-instrumentation-grpc` interceptors, which also carry the trace context across services.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

log = logging.getLogger(__name__)

_OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def resolve_mode(mode: str) -> str:
    """`auto` becomes `otlp` when an OTLP endpoint is configured in the environment, else `off`."""
    if mode != "auto":
        return mode
    return "otlp" if any(os.environ.get(var) for var in _OTLP_ENDPOINT_VARS) else "off"


def _exporter(mode: str) -> SpanExporter:
    if mode == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if mode == "console":
        return ConsoleSpanExporter()
    raise ValueError(f"unknown telemetry mode {mode!r}")


def setup_telemetry(service: str, mode: str = "auto") -> TracerProvider | None:
    """Install a global tracer provider for `service`; None when telemetry is off."""
    mode = resolve_mode(mode)
    if mode == "off":
        return None
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: f"openlora-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(_exporter(mode)))
    trace.set_tracer_provider(provider)
    log.info("telemetry on", extra={"exporter": mode})
    return provider


def server_interceptors(provider: TracerProvider | None) -> list[Any]:
    """Interceptors that open a server span per call (empty when tracing is off)."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=provider)]  # type: ignore[no-untyped-call]


def client_interceptors(provider: TracerProvider | None) -> list[Any]:
    """Interceptors that open a client span per call and propagate the trace context."""
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=provider))  # type: ignore[no-untyped-call]
