"""The worker's domain: a checked request in, a stream of chunks out, usage counted per chunk.

No gRPC here: the servicer converts messages. A request's life: resolve its adapter (load, check,
pin, hand off), hand it to the engine process, turn what it streams into chunks with text (stop
strings are found here, where the tokenizer is: the engine only sees token ids), and record usage
for every token that reached the stream (prompt tokens once the prefill produced the first token).
A chunk carries every token the engine produced since the last one was sent. A client that hangs
up or runs out of deadline cancels the handler; the engine frees the request's KV blocks before its
next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, cast

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.errors import InvalidArgument, Unavailable
from services.inference.adapters import AdapterResolver, ResolvedAdapter
from services.inference.engine.detokenizer import IncrementalDetokenizer
from services.inference.engine.sequence import FinishReason
from services.inference.engine_process.client import EngineClient, EngineOutput, EngineUnavailable
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
    engine: EngineClient
    tokenizer: Any  # None: token ids only (no text, no stop strings)
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
            if self.reporter is not None:
                self.reporter.track(usage)
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
                usage.close()
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
        sampling = request.sampling
        detokenizer = None
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, sampling.stop)
        elif sampling.stop:
            raise InvalidArgument("sampling.stop", "stop strings need a worker started with a tokenizer")
        outputs = cast(
            AsyncGenerator[EngineOutput],  # declared an iterator; it is an async generator
            self.engine.generate(
                usage.request_id,
                request.prompt_token_ids,
                dataclasses.replace(sampling, stop=()) if sampling.stop else sampling,
                adapter=resolved.handle if resolved else None,
            ),
        )
        last = arrived
        # aclosing: a stream that ends early (a stop string, a hang-up) aborts its engine request now.
        async with contextlib.aclosing(outputs):
            while True:
                try:
                    out = await anext(outputs)
                except StopAsyncIteration:
                    return
                except EngineUnavailable as exc:  # the engine is down or restarting: not the request's fault
                    raise Unavailable(
                        f"this worker's engine is not serving: {exc}", retry_after_s=1.0
                    ) from None
                token_ids, logprobs, finish = out.token_ids, out.logprobs, out.finish_reason
                text = ""
                if detokenizer is not None:
                    token_ids, logprobs, finish, text = _detokenize(detokenizer, token_ids, logprobs, finish)
                now = time.perf_counter()
                if token_ids and not usage.prompt_tokens:
                    usage.prompt(len(request.prompt_token_ids))
                    self.metrics.ttft.observe(now - arrived)
                    self.metrics.prompt_tokens.inc(usage.prompt_tokens)
                elif token_ids:
                    self.metrics.inter_token.observe((now - last) / len(token_ids))
                last = now
                done = finish is not None
                # Billed as the chunk is handed to the transport, which sends it: a stream cancelled
                # while its chunk is being written (a hang-up, the relay's batch write) still bills
                # what went out. Tokens the engine made but never handed over are not billed.
                usage.completion(len(token_ids))
                self.metrics.completion_tokens.inc(len(token_ids))
                yield Chunk(
                    token_ids,
                    text,
                    logprobs,
                    finish,
                    usage.prompt_tokens if done else 0,
                    usage.completion_tokens if done else 0,
                )
                if done:
                    return  # a stop string ended it before the engine knew: aclosing aborts the rest


def _detokenize(
    detokenizer: IncrementalDetokenizer,
    token_ids: list[int],
    logprobs: list[float],
    finish: FinishReason | None,
) -> tuple[list[int], list[float], FinishReason | None, str]:
    """The chunk's text; a stop string found in it ends the chunk (and the request) at its token."""
    if not detokenizer.stop:
        text = detokenizer.add_many(token_ids)
        if finish is not None:
            text += detokenizer.flush()
        return token_ids, logprobs, finish, text
    parts = []
    for i, token_id in enumerate(token_ids):
        parts.append(detokenizer.add(token_id))
        if detokenizer.stopped:
            # Tokens the engine produced past the stop are neither sent nor billed.
            return token_ids[: i + 1], logprobs[: i + 1], FinishReason.STOP, "".join(parts)
    if finish is not None:
        parts.append(detokenizer.flush())
    return token_ids, logprobs, finish, "".join(parts)
