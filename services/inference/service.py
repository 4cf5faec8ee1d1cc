"""The worker's domain: a checked request in, a stream of chunks out, usage counted per chunk.

No gRPC here: the servicer converts messages. A request's life: resolve its adapter (load, check,
pin, hand off), hand it to the engine process, turn what it streams into chunks with text (stop
strings are found here, where the tokenizer is: the engine only sees token ids), and record usage
for every token that reached the stream (prompt tokens once the prefill produced the first token;
a request cancelled before that is billed the prefill the engine had done when its abort arrived).
A chunk carries every token the engine produced since the last one was sent. A client that hangs
up or runs out of deadline cancels the handler; the engine frees the request's KV blocks before its
next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.errors import InvalidArgument, Unavailable
from services.inference.adapter_cache import AdapterKey
from services.inference.adapters import AdapterResolver, ResolvedAdapter
from services.inference.chat_templates import AdapterTemplates
from services.inference.chunks import Chunk, ChunkSink, QueueSink, SharedSink
from services.inference.engine.detokenizer import IncrementalDetokenizer
from services.inference.engine.llm_engine import EngineStats
from services.inference.engine.sequence import FinishReason
from services.inference.engine_process.client import (
    EngineClient,
    EngineOutput,
    EngineStream,
    EngineUnavailable,
)
from services.inference.prompts import Prompter
from services.inference.token_bytes import TokenBytes
from services.inference.usage.records import RequestUsage, new_usage_id
from services.inference.usage.reporter import UsageReporter
from services.inference.validation import Limits, ParsedRequest, with_prompt
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
class CachedAdapterInfo:
    id: str
    version: str
    digest: str
    tier: str  # the fastest holding it: device, host or disk
    rank: int  # 0 on disk: unknown until parsed
    size_bytes: int


@dataclass(frozen=True)
class ModelListing:
    model: ModelDescription
    worker_id: str
    stats: EngineStats | None  # as the engine process last reported; None while it restarts
    adapters: list[CachedAdapterInfo]  # fastest tier first, most recently used first within one


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

    templates: AdapterTemplates | None = None  # adapters' own chat templates (None: base model's only)

    def __post_init__(self) -> None:
        self.token_bytes = TokenBytes(self.tokenizer) if self.tokenizer is not None else None
        self.prompter = Prompter(self.tokenizer) if self.tokenizer is not None else None

    async def _with_adapter_template(
        self, request: ParsedRequest, resolved: ResolvedAdapter | None
    ) -> ParsedRequest:
        """A conversation for an adapter that ships its own chat template, rendered with that one."""
        if not request.messages or request.adapter is None or resolved is None:
            return request
        if self.templates is None or self.prompter is None:
            return request
        adapter_id, version, _ = resolved.components[0]
        template = await self.templates.of(adapter_id, version)
        if not template:
            return request
        return with_prompt(request, self.prompter.chat(request.messages, template=template), self.limits)

    def list_models(self) -> ModelListing:
        """The model served and the adapters this worker holds (on the event loop: the slot state
        is the snapshot the engine process last published)."""
        return ModelListing(self.model, self.worker_id, self.engine.stats(), self._cached_adapters())

    def _cached_adapters(self) -> list[CachedAdapterInfo]:
        cache = self.resolver.cache
        if cache is None:
            return []
        in_slots = set(self.engine.slots.resident_keys())
        listed = [
            CachedAdapterInfo(
                a.id, a.version, a.digest, "device" if a.key in in_slots else "host", a.rank, a.size_bytes
            )
            for a in reversed(cache.host.adapters())  # most recently used first
        ]
        in_ram = {(a.id, a.version) for a in listed}
        for key, digest, size in cache.disk.entries():
            on_disk = AdapterKey.parse(key)
            if (on_disk.id, on_disk.version) not in in_ram:
                listed.append(CachedAdapterInfo(on_disk.id, on_disk.version, digest, "disk", 0, size))
        order = {"device": 0, "host": 1, "disk": 2}
        listed.sort(key=lambda a: order[a.tier])  # stable: recency kept within a tier
        return listed

    async def generate(self, request: ParsedRequest) -> AsyncGenerator[Chunk]:
        """Stream the request's chunks; the last carries `finish_reason` and usage."""
        if request.n > 1:
            async with contextlib.aclosing(self._generate_samples(request)) as samples:
                async for chunk in samples:
                    yield chunk
            return
        async with self._request(request) as (samples, outcome):
            chunks = samples[0]
            async with contextlib.aclosing(self._pull(request, chunks)) as stream:
                async for chunk in stream:
                    if chunk.finish_reason is not None:
                        outcome[0] = chunk.finish_reason.value
                    yield chunk

    async def _generate_samples(self, request: ParsedRequest) -> AsyncGenerator[Chunk]:
        """Several samples' chunks, in the order they come: `serve` into a queue."""
        sink = QueueSink()
        serving = asyncio.ensure_future(self.serve(request, sink))
        serving.add_done_callback(lambda _: sink.queue.put_nowait(None))
        try:
            while (chunk := await sink.queue.get()) is not None:
                yield chunk
            await serving  # raises what ended it
        finally:
            serving.cancel()

    async def serve(self, request: ParsedRequest, sink: ChunkSink) -> None:
        """Run the request to its end, handing each chunk to `sink` from inside the engine client's
        step handler: one pass over a step's outputs serves every stream, with no task woken and no
        generator resumed per chunk (a slow model makes one chunk per token, so this is the front's
        cost per token). The sink says when it can take the next chunk; until then the tokens wait
        in the engine stream, which cancels the request once too many do."""
        async with self._request(request) as (samples, outcome):
            shared = sink if len(samples) == 1 else SharedSink(sink)
            pushers: list[_Pusher] = []
            try:
                for chunks in samples:
                    pushers.append(_Pusher(self, request, chunks, shared))
                await asyncio.gather(*(pusher.done for pusher in pushers))
            finally:
                for pusher in pushers:
                    pusher.stream.close()
                    if not pusher.done.done():
                        pusher.done.cancel()
                    elif not pusher.done.cancelled():  # a cancelled gather cancelled them all
                        pusher.done.exception()  # retrieved: gather re-raised the first one only
                finishes = [p.finish for p in pushers if p.finish is not None]
                if len(finishes) == len(samples):
                    outcome[0] = finishes[-1].value

    @contextlib.asynccontextmanager
    async def _request(self, request: ParsedRequest) -> AsyncIterator[tuple[list[_ChunkMaker], list[str]]]:
        """A request's life around its chunks: adapter resolved and released, usage tracked, span and
        outcome metric. Yields a chunk maker per sample and a one-item list the caller sets the
        outcome in."""
        arrived = time.perf_counter()
        outcome = ["error"]
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
                resolved = await self.resolver.resolve(request.adapter, request.mix)
            if resolved is not None:
                span.set_attributes(
                    {"openlora.adapter.key": resolved.key, "openlora.cache.tier": resolved.tier}
                )
            request = await self._with_adapter_template(request, resolved)
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
            samples = _Samples(request.n)
            yield (
                [_ChunkMaker(self, request, resolved, usage, arrived, samples, i) for i in range(request.n)],
                outcome,
            )
        except (asyncio.CancelledError, GeneratorExit):
            outcome[0] = "cancelled"
            raise
        except Exception as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, str(exc))
            raise
        finally:
            if resolved is not None:
                resolved.release()
            self.metrics.requests.labels(outcome[0]).inc()
            span.set_attribute("openlora.outcome", outcome[0])
            if usage is not None:
                usage.close()
                span.set_attributes(
                    {
                        "openlora.tokens.prompt": usage.prompt_tokens,
                        "openlora.tokens.completion": usage.completion_tokens,
                    }
                )
            span.end()

    async def _pull(self, request: ParsedRequest, chunks: _ChunkMaker) -> AsyncGenerator[Chunk]:
        stream = chunks.open(self.engine)
        # A stream that ends early (a stop string, a hang-up) aborts its engine request on close.
        try:
            async for out in stream.outputs():
                chunk = chunks.make(out)
                yield chunk
                if chunk.finish_reason is not None:
                    return  # a stop string may end it before the engine knew: close aborts the rest
        except EngineUnavailable as exc:
            raise _unavailable(exc) from None
        finally:
            stream.close()


def _unavailable(exc: EngineUnavailable) -> Unavailable:
    """The engine is down or restarting: not the request's fault."""
    return Unavailable(f"this worker's engine is not serving: {exc}", retry_after_s=1.0)


class _Samples:
    """How many of a request's samples are still generating: usage goes on the very last chunk."""

    __slots__ = ("unfinished",)

    def __init__(self, n: int) -> None:
        self.unfinished = n

    def finish(self) -> bool:
        """One sample ended; True when it was the last."""
        self.unfinished -= 1
        return self.unfinished == 0


class _ChunkMaker:
    """Engine output → chunk of one request: text and stop strings, usage and token metrics."""

    def __init__(
        self,
        service: WorkerService,
        request: ParsedRequest,
        resolved: ResolvedAdapter | None,
        usage: RequestUsage,
        arrived: float,
        samples: _Samples,
        index: int,
    ) -> None:
        sampling = request.sampling
        if index and sampling.seed is not None:
            sampling = dataclasses.replace(sampling, seed=sampling.seed + index)
        self.index = index
        self.samples = samples
        # The engine knows sample 0 by the usage id; the others wait for its prompt's blocks.
        self.engine_id = usage.request_id if index == 0 else f"{usage.request_id}.{index}"
        self.after = usage.request_id if index else None
        self.detokenizer = None
        self.token_bytes = service.token_bytes
        if service.tokenizer is not None:
            self.detokenizer = IncrementalDetokenizer(
                service.tokenizer, request.prompt_token_ids, sampling.stop
            )
        elif sampling.stop:
            raise InvalidArgument("sampling.stop", "stop strings need a worker started with a tokenizer")
        # The engine sees token ids only: stop strings are found here, where the tokenizer is.
        self.engine_sampling = dataclasses.replace(sampling, stop=()) if sampling.stop else sampling
        self.adapter = resolved.handle if resolved else None
        self.usage = usage
        self.metrics = service.metrics
        self.prompt_token_ids = request.prompt_token_ids
        self.prompt_tokens = len(request.prompt_token_ids)
        self.arrived = arrived
        self.last = arrived

    def open(self, engine: EngineClient, on_news: Callable[[], None] | None = None) -> EngineStream:
        """Start this sample's engine request; the request's usage stays open until the engine holds
        nothing more of it, so a prefill cancelled before its first token is billed too."""
        try:
            stream = engine.open(
                self.engine_id,
                self.prompt_token_ids,
                self.engine_sampling,
                adapter=self.adapter,
                on_news=on_news,
                after=self.after,
                on_end=self._engine_done,
            )
        except EngineUnavailable as exc:
            raise _unavailable(exc) from None
        self.usage.hold()
        return stream

    def _engine_done(self, prompt_tokens_taken: int) -> None:
        if prompt_tokens_taken and not self.usage.prompt_tokens:
            self.metrics.prompt_tokens.inc(prompt_tokens_taken)  # cancelled before its first token
        self.usage.engine_done(prompt_tokens_taken)

    def make(self, out: EngineOutput) -> Chunk:
        token_ids, logprobs, finish = out.token_ids, out.logprobs, out.finish_reason
        top = out.top_logprobs
        text = ""
        if self.detokenizer is not None:
            token_ids, logprobs, finish, text = _detokenize(self.detokenizer, token_ids, logprobs, finish)
            del top[len(token_ids) :]  # past a stop string
        usage, metrics = self.usage, self.metrics
        now = time.perf_counter()
        if token_ids and not usage.prompt_tokens:
            usage.prompt(self.prompt_tokens)
            metrics.ttft.observe(now - self.arrived)
            metrics.prompt_tokens.inc(usage.prompt_tokens)
        elif token_ids:
            metrics.inter_token.observe((now - self.last) / len(token_ids))
        self.last = now
        done = finish is not None and self.samples.finish()
        # Billed as the chunk is handed to the transport, which sends it: a stream cancelled while
        # its chunk is being written (a hang-up, the relay's batch write) still bills what went
        # out. Tokens the engine made but never handed over are not billed.
        usage.completion(len(token_ids))
        metrics.completion_tokens.inc(len(token_ids))
        return Chunk(
            token_ids,
            text,
            logprobs,
            finish,
            usage.prompt_tokens if done else 0,
            usage.completion_tokens if done else 0,
            [(ids, values, self._bytes_of(ids)) for ids, values in top],
            self._bytes_of(token_ids) if logprobs else [],
            self.index,
            last=done,
        )

    def _bytes_of(self, token_ids: list[int]) -> list[bytes]:
        return self.token_bytes(token_ids) if self.token_bytes is not None else []


class _Pusher:
    """`WorkerService.serve`'s request: engine news → chunk → sink, called back, never awaited."""

    def __init__(
        self, service: WorkerService, request: ParsedRequest, chunks: _ChunkMaker, sink: ChunkSink
    ) -> None:
        self.chunks = chunks
        self.sink = sink
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.finish: FinishReason | None = None
        self.held = False  # news came while the sink was busy: take it once it is writable
        self.stream = chunks.open(service.engine, on_news=self._news)
        self.stream.waiting = True

    def _news(self) -> None:
        if self.done.done():
            return
        # An error ends the stream now, even behind a chunk still being written (its end event
        # follows that chunk): a reader that stopped reading must not keep the request open.
        if not self.sink.writable and self.stream.error is None:
            if not self.held:
                self.held = True
                # The chunk being written may be another sample's: ask to hear when it is.
                self.sink.on_writable(self._writable)
            return
        self._send()

    def _writable(self) -> None:
        self.stream.waiting = True
        if self.held and not self.done.done():
            self.held = False
            self._send()

    def _send(self) -> None:
        # Called from the engine client's step handler: whatever goes wrong here is this stream's
        # error, never the handler's, which still has every other stream of the step to serve.
        try:
            out = self.stream.take()
            if not out.token_ids and not out.finished:
                return
            chunk = self.chunks.make(out)
            self.sink.send(chunk)
        except EngineUnavailable as exc:
            self._fail(_unavailable(exc))
            return
        except Exception as exc:  # a refusal, a slow reader, a tokenizer failure: the stream's error
            self._fail(exc)
            return
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason
            self.done.set_result(None)  # a stop string may end it first: serve's close aborts the rest
            return
        self.stream.waiting = False
        self.sink.on_writable(self._writable)

    def _fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)


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
