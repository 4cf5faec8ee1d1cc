"""The worker's end of the gateway's link (`openlora.v1.WorkerRelay`): many Generate streams, one call.

Each stream started on the link runs the worker's own `Generate` handler, as a call of its own would,
with what the server kit's interceptor gives a call: the request id made current for logs, errors
mapped (a `ServiceError` becomes its status and details; anything else INTERNAL naming the request
id, its traceback to the log), an access-log record, the client's deadline, and draining (a stream
started once the server drains is refused UNAVAILABLE; those running are counted, so the drain waits
for them).

Chunks of every stream go down together, one message per write, and a write holds at most one chunk
of each stream (the gateway relays each as it came, without merging). A stream hands over its next
chunk only once the previous one was written (`StreamSink.writable`); the worker's handler
(`InferenceServicer.serve`) hands chunks over from the engine client's step handler, so a step's
chunks for every stream are made in one pass with no task woken per stream, and a stream whose
chunks come slower than the link writes (a large model, one token a step) never waits. A gateway
that stops reading stops the streams (their engine buffers fill and cancel them, as for a slow
client of `Generate` itself) and a busy link carries fewer, fuller messages.
When the call ends, every stream still running on it is cancelled, as a client hanging up would.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from openlora.v1 import inference_pb2, relay_pb2, relay_pb2_grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate

from services.common.contracts import SERVICE_NAMES
from services.common.errors import ResourceExhausted, ServiceError
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.interceptors import (
    REQUEST_ID_KEY,
    InflightCalls,
    draining_refusal,
    error_status,
    log_call,
)
from services.common.log import request_id_var
from services.common.request_checks import is_valid_id

log = logging.getLogger("openlora.rpc")

GENERATE_METHOD = f"/{SERVICE_NAMES['inference']}/Generate"
# A write well under any message limit; what does not fit goes in the next one.
MAX_BATCH_BYTES = 1 << 20
_EVENT_OVERHEAD_BYTES = 16

# A `Generate` handler: (request, context) -> async iterator of chunks.
GenerateHandler = Callable[[inference_pb2.GenerateRequest, Any], AsyncIterator[inference_pb2.GenerateChunk]]
# A stream's handler on the link: (request, context, sink) -> runs to the stream's end, sending its
# chunks to the sink; an exception ends the stream with its status, as a call's would.
ServeHandler = Callable[[inference_pb2.GenerateRequest, Any, "StreamSink"], Awaitable[None]]


class StreamContext:
    """What a `Generate` handler may ask of its call, for a stream on the link."""

    def __init__(self, metadata: tuple[tuple[str, str], ...], deadline: float | None) -> None:
        self._metadata = metadata
        self._deadline = deadline

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())


def _end_event(stream_id: int, code: grpc.StatusCode, message: str = "", details: bytes = b"") -> Any:
    return relay_pb2.RelayEvent(
        stream_id=stream_id,
        end=relay_pb2.RelayEnd(code=code.value[0], message=message, status_details=details),
    )


class StreamSink:
    """Where one stream's handler sends its chunks: one at a time, each once the previous was written."""

    __slots__ = ("_callback", "_link", "busy", "sent", "stream_id")

    def __init__(self, link: _Link, stream_id: int) -> None:
        self._link = link
        self.stream_id = stream_id
        self.busy = False  # a chunk of ours waits to be written
        self.sent = 0
        self._callback: Callable[[], None] | None = None

    @property
    def writable(self) -> bool:
        return not self.busy

    def send(self, chunk: inference_pb2.GenerateChunk) -> None:
        """Queue the chunk for the next write (billed by now: it goes even if the stream is cancelled)."""
        self.busy = True
        self.sent += 1
        self._link._push(
            relay_pb2.RelayEvent(
                stream_id=self.stream_id,
                chunk=chunk.SerializeToString(),
                completion_tokens=len(chunk.token_ids),
                prompt_tokens=chunk.usage.prompt_tokens,
            ),
            self,
        )

    def on_writable(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the chunk last sent was written (at once if it was)."""
        if self.busy:
            self._callback = callback
        else:
            callback()

    async def wait_writable(self) -> None:
        if self.busy:
            ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def written() -> None:
                if not ready.done():
                    ready.set_result(None)

            self.on_writable(written)
            await ready

    def _written(self) -> None:
        self.busy = False
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def from_generator(generate: GenerateHandler) -> ServeHandler:
    """A `Generate` handler (an async generator of chunks) as a handler on the link."""

    async def serve(request: inference_pb2.GenerateRequest, context: Any, sink: StreamSink) -> None:
        chunks = generate(request, context)
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for chunk in chunks:
                try:
                    await sink.wait_writable()
                finally:
                    # Even when cancelled while waiting: the handler billed the chunk as it yielded
                    # it, so it goes to the transport as it would have without the wait.
                    sink.send(chunk)

    return serve


class _Link:
    """The streams of one Relay call and the events waiting to go down."""

    def __init__(self, serve: ServeHandler, inflight: InflightCalls, max_calls: int | None) -> None:
        self.serve = serve
        self.inflight = inflight
        self.max_calls = max_calls
        self.streams: dict[int, asyncio.Task[None]] = {}
        self.events: list[Any] = []
        self.senders: list[StreamSink | None] = []  # whose chunk each event is (None: an end)
        self.wakeup = asyncio.Event()
        self.reading = True

    async def read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for up in requests:
                for start in up.starts:
                    self._start(start)
                for stream_id in up.cancels:
                    task = self.streams.get(stream_id)
                    if task is not None:
                        task.cancel()
        finally:
            self.reading = False
            self.wakeup.set()

    async def batches(self) -> AsyncIterator[Any]:
        """One RelayDown per write, until the gateway stopped sending and every stream ended."""
        while True:
            if self.events:
                events, senders = self._take()
                yield relay_pb2.RelayDown(events=events)
                for sender in senders:
                    if sender is not None:
                        sender._written()
                continue
            # Checked before every wait: the last stream may end, and the gateway stop sending, while
            # the last write is under way, and then nothing would wake this loop again.
            if not self.reading and not self.streams:
                return
            self.wakeup.clear()
            await self.wakeup.wait()

    def _take(self) -> tuple[list[Any], list[StreamSink | None]]:
        """The events of the next write (under `MAX_BATCH_BYTES`) and whose chunks they are."""
        size, count = 0, 0
        for event in self.events:
            size += len(event.chunk) + _EVENT_OVERHEAD_BYTES
            if count and size > MAX_BATCH_BYTES:
                break
            count += 1
        taken, self.events = self.events[:count], self.events[count:]
        senders, self.senders = self.senders[:count], self.senders[count:]
        return taken, senders

    def _push(self, event: Any, sender: StreamSink | None = None) -> None:
        self.events.append(event)
        self.senders.append(sender)
        self.wakeup.set()

    def _start(self, start: Any) -> None:
        if start.stream_id in self.streams:
            self._push(_end_event(start.stream_id, grpc.StatusCode.INTERNAL, "stream id already open"))
            return
        task = asyncio.get_running_loop().create_task(self._serve(start))
        self.streams[start.stream_id] = task
        task.add_done_callback(lambda _: self._finished(start.stream_id))

    def _finished(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.wakeup.set()

    async def _serve(self, start: Any) -> None:
        """Run one stream to its end event (none when cancelled: the gateway no longer listens)."""
        request = start.request
        request_id = request.request_id if is_valid_id(request.request_id) else uuid.uuid4().hex
        request_id_var.set(request_id)  # this task's own context: it ends with the task
        if start.trace_headers:  # the worker's spans join the gateway's trace
            otel_context.attach(propagate.extract(dict(start.trace_headers)))
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        refusal = self._refusal()
        if refusal is not None:
            code = self._fail(start.stream_id, refusal, request_id)
            log_call(GENERATE_METHOD, code, started, 0, relayed=True)
            return
        self.inflight.enter()
        metadata = ((REQUEST_ID_KEY, request_id), *start.trace_headers.items())
        deadline = time.monotonic() + start.timeout_s if start.timeout_s > 0 else None
        sink = StreamSink(self, start.stream_id)
        try:
            async with asyncio.timeout_at(_loop_time(deadline)) as timeout:
                await self.serve(request, StreamContext(metadata, deadline), sink)
            self._push(_end_event(start.stream_id, code))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except TimeoutError as exc:
            if not timeout.expired():  # the handler's own, not the client's deadline
                code = self._fail(start.stream_id, exc, request_id)
            else:
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                self._push(_end_event(start.stream_id, code, "Deadline Exceeded"))
        except Exception as exc:
            code = self._fail(start.stream_id, exc, request_id)
        finally:
            self.inflight.exit()
            log_call(GENERATE_METHOD, code, started, sink.sent, relayed=True)

    def _refusal(self) -> ServiceError | None:
        """Why a new stream is refused, as a new call would be by the server."""
        if self.inflight.draining:
            return draining_refusal()
        if self.max_calls is not None and self.inflight.count >= self.max_calls:
            return ResourceExhausted(
                f"the worker serves {self.max_calls} calls at once (max_concurrent_rpcs)"
            )
        return None

    def _fail(self, stream_id: int, exc: Exception, request_id: str) -> grpc.StatusCode:
        code, message, details = error_status(exc, GENERATE_METHOD, request_id)
        self._push(_end_event(stream_id, code, message, details))
        return code

    async def close(self) -> None:
        """Cancel every stream still running (the call ended) and wait for them."""
        tasks = list(self.streams.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _loop_time(deadline: float | None) -> float | None:
    """A `time.monotonic()` deadline on the event loop's clock (the one `asyncio.timeout_at` reads)."""
    if deadline is None:
        return None
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


class RelayServicer(relay_pb2_grpc.WorkerRelayServicer):
    """Serves `serve` (a servicer's `serve`, or a `Generate` through `from_generator`) to the gateway
    over one call per gateway."""

    def __init__(self, serve: ServeHandler, inflight: InflightCalls, max_calls: int | None) -> None:
        self.serve = serve
        self.inflight = inflight
        self.max_calls = max_calls

    async def Relay(self, request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        # At once: the gateway writes only once it knows the call was accepted (see worker_link).
        await context.send_initial_metadata(())
        link = _Link(self.serve, self.inflight, self.max_calls)
        reader = asyncio.get_running_loop().create_task(link.read(request_iterator))
        try:
            async for message in link.batches():
                yield message
        finally:
            reader.cancel()
            await link.close()
            with contextlib.suppress(asyncio.CancelledError, grpc.RpcError):
                await reader


def relay_binding(serve: ServeHandler, server: GrpcServer) -> ServiceBinding:
    """The relay served beside `server`'s other services: its streams count in the server's drain and
    against its `max_concurrent_rpcs`, as calls do."""
    servicer = RelayServicer(serve, server.inflight, server.settings.max_concurrent_rpcs)
    return ServiceBinding(
        name=SERVICE_NAMES["relay"],
        attach=lambda grpc_server: relay_pb2_grpc.add_WorkerRelayServicer_to_server(servicer, grpc_server),
    )
