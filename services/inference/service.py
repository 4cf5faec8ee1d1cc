"""The worker's domain: a checked request in, a stream of chunks out, usage recorded per token.

No gRPC here: the servicer converts messages. A request's life: resolve its adapter (load, check,
pin), hand it to the engine, stream each step's tokens and text, and record usage for every token
that reached the stream (prompt tokens once the prefill produced the first token). A client that
hangs up or runs out of deadline cancels the handler; the engine frees the request's KV blocks
before its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import cast

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.errors import Unavailable
from services.inference.adapters import AdapterResolver, ResolvedAdapter
from services.inference.engine.async_engine import AsyncEngine
from services.inference.engine.llm_engine import StepOutput
from services.inference.engine.sequence import FinishReason
from services.inference.usage.records import RequestUsage, new_usage_id
from services.inference.usage.reporter import UsageReporter
from services.inference.validation import Limits, ParsedRequest
from services.inference.worker_metrics import WorkerMetrics


def traceparent_of(span: trace.Span) -> str:
    """The span's W3C traceparent, or "" when it is not recorded (tracing off)."""
    context = span.get_span_context()
    if not context.is_valid:
        return ""
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


@dataclass(frozen=True)
class ModelDescription:
    name: str
    dtype: str
    quantization: str
    max_context: int
    attention_backend: str
    lora_op: str


@dataclass(frozen=True)
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0  # usage, on the last chunk
    completion_tokens: int = 0


@dataclass
class WorkerService:
    engine: AsyncEngine
    resolver: AdapterResolver
    reporter: UsageReporter | None
    metrics: WorkerMetrics
    limits: Limits
    model: ModelDescription
    worker_id: str
    tracer: trace.Tracer

    async def generate(self, request: ParsedRequest) -> AsyncGenerator[Chunk]:
        """Stream the request's chunks; the last carries `finish_reason` and usage."""
        arrived = time.perf_counter()
        outcome = "error"
        # Not made current across yields: the stream may be resumed or closed from another context.
        # The engine and the ledger know the request by an id of ours: the client's may be reused.
        usage_id = new_usage_id()
        span = self.tracer.start_span(
            "generate",
            attributes={"openlora.request_id": request.request_id, "openlora.usage_id": usage_id},
        )
        usage: RequestUsage | None = None
        resolved: ResolvedAdapter | None = None
        try:
            with trace.use_span(span, end_on_exit=False):
                resolved = await self.resolver.resolve(request.adapter_ref, request.mix)
            if resolved is not None:
                span.set_attributes(
                    {"openlora.adapter.key": resolved.key, "openlora.cache.tier": resolved.tier}
                )
            components = resolved.components if resolved else ()
            usage = RequestUsage(
                usage_id,
                request.tenant,
                self.worker_id,
                components,
                traceparent_of(span),
                client_request_id=request.request_id,
            )
            async with contextlib.aclosing(self._stream(request, resolved, usage, arrived)) as chunks:
                async for chunk in chunks:
                    if chunk.finish_reason is not None:
                        outcome = chunk.finish_reason.value
                    yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            outcome = "cancelled"
            raise
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, str(exc))
            raise
        finally:
            if resolved is not None:
                resolved.release()
            self.metrics.requests.labels(outcome).inc()
            span.set_attribute("openlora.outcome", outcome)
            if usage is not None:
                span.set_attributes(
                    {
                        "openlora.tokens.prompt": usage.prompt_tokens,
                        "openlora.tokens.completion": usage.completion_tokens,
                    }
                )
            span.end()

    async def _stream(
        self, request: ParsedRequest, resolved: ResolvedAdapter | None, usage: RequestUsage, arrived: float
    ) -> AsyncGenerator[Chunk]:
        outputs = cast(
            AsyncGenerator[StepOutput],  # declared an iterator; it is an async generator
            self.engine.generate(
                usage.request_id,
                request.prompt_token_ids,
                request.sampling,
                adapter_key=resolved.key if resolved else None,
            ),
        )
        last = arrived
        # aclosing: a stream that ends early aborts its engine request now, not when collected.
        async with contextlib.aclosing(outputs):
            while True:
                try:
                    out = await anext(outputs)
                except StopAsyncIteration:
                    return
                except RuntimeError as exc:  # the engine stopped or a step failed: not the request's fault
                    raise Unavailable(f"this worker's engine failed: {exc}", retry_after_s=1.0) from None
                now = time.perf_counter()
                records = []
                if out.token_ids and not usage.prompt_tokens:
                    records = usage.prompt(len(request.prompt_token_ids))
                    self.metrics.ttft.observe(now - arrived)
                    self.metrics.tokens.labels("prompt").inc(usage.prompt_tokens)
                elif out.token_ids:
                    self.metrics.inter_token.observe(now - last)
                last = now
                records += usage.completion(len(out.token_ids))
                chunk = Chunk(
                    list(out.token_ids),
                    out.text,
                    list(out.logprobs),
                    out.finish_reason,
                    usage.prompt_tokens if out.finished else 0,
                    usage.completion_tokens if out.finished else 0,
                )
                yield chunk
                # Only tokens handed to the stream are billed: a cancellation at the yield drops them.
                self.metrics.tokens.labels("completion").inc(len(out.token_ids))
                if self.reporter is not None and records:
                    self.reporter.record(records)
