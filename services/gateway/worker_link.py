"""The gateway's end of a worker's relay call: every Generate stream to that worker on one call.

A stream costs a message each way instead of a gRPC call on both sides, and the worker sends the
chunks of all its streams in one message per write. The call is opened by the first stream and
opened again by the first stream after it ended. When it ends, every stream still open on it fails
as a call to a worker that cannot be reached would (`UNAVAILABLE`, not answered by the worker), so
the relay's retry rules apply unchanged; a stream the worker ended with an error raises that error
as the worker's own call would have, request id and details included. A worker without the relay
service (an older one) answers UNIMPLEMENTED: `RelayUnsupported` tells the relay to use one
Generate call per stream there instead.

Chunks are handed on as the worker serialized them. Those of one stream that arrive while its client
has not yet taken the previous are merged into one, so a slow client costs memory bounded by its
request's output, never the link's progress.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, NamedTuple, cast

import grpc
from openlora.v1 import inference_pb2, relay_pb2, relay_pb2_grpc

from services.common.interceptors import REQUEST_ID_KEY, STATUS_DETAILS_KEY

log = logging.getLogger("openlora.gateway.link")


class RelayUnsupported(Exception):
    """The worker does not serve the relay; nothing was sent to it."""


class Relayed(NamedTuple):
    """A chunk for the client, serialized, with what the gateway meters of it."""

    data: bytes
    completion_tokens: int
    prompt_tokens: int

    @classmethod
    def parse(cls, data: bytes) -> Relayed:
        chunk = inference_pb2.GenerateChunk.FromString(data)
        return cls(data, len(chunk.token_ids), chunk.usage.prompt_tokens)


def merge(events: list[Any]) -> Relayed:
    """The chunk events of one stream as one chunk: tokens, text and logprobs (with their alternatives
    and bytes) in order, the last's end."""
    if len(events) == 1:
        event = events[0]
        return Relayed(event.chunk, event.completion_tokens, event.prompt_tokens)
    merged = inference_pb2.GenerateChunk()
    text = []
    for event in events:
        chunk = inference_pb2.GenerateChunk.FromString(event.chunk)
        merged.token_ids.extend(chunk.token_ids)
        merged.logprobs.extend(chunk.logprobs)
        merged.top_logprobs.extend(chunk.top_logprobs)
        merged.token_bytes.extend(chunk.token_bytes)
        text.append(chunk.text)
        if chunk.finish_reason:
            merged.finish_reason = chunk.finish_reason
        if chunk.HasField("usage"):
            merged.usage.CopyFrom(chunk.usage)
    merged.text = "".join(text)
    return Relayed(merged.SerializeToString(), len(merged.token_ids), merged.usage.prompt_tokens)


def _status(
    code: grpc.StatusCode, message: str, *, request_id: str = "", details: bytes = b""
) -> grpc.aio.AioRpcError:
    """The error a call of the stream's own would have raised; `request_id` marks it answered."""
    trailing: list[tuple[str, str | bytes]] = []
    if request_id:
        trailing.append((REQUEST_ID_KEY, request_id))
    if details:
        trailing.append((STATUS_DETAILS_KEY, details))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details=message)


_CODES = {code.value[0]: code for code in grpc.StatusCode}
# Tokens of one stream the gateway holds for a client that does not read them (a full context's
# worth); past that the worker is told to stop.
MAX_UNREAD_TOKENS = 8192


class _Inbox:
    """The events of one stream not yet taken, and how the link ended if it did."""

    __slots__ = ("events", "failure", "unread_tokens", "waiter")

    def __init__(self) -> None:
        self.events: list[Any] = []
        self.failure: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.unread_tokens = 0

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def push(self, event: Any) -> None:
        self.events.append(event)
        self.unread_tokens += event.completion_tokens
        self._wake()

    def fail(self, failure: BaseException) -> None:
        self.failure = failure
        self._wake()

    async def take(self) -> list[Any]:
        while not self.events:
            if self.failure is not None:
                raise self.failure
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        events, self.events = self.events, []
        self.unread_tokens = 0
        return events


_RELAY_UP_OVERHEAD = 64 * 1024


def _packed(starts: list[tuple[Any, int]], cancels: list[int], max_bytes: int) -> list[Any]:
    """The starts (each with its size) and cancels as few RelayUp messages as fit `max_bytes` each
    (one start always fits)."""
    ups = [relay_pb2.RelayUp(cancels=cancels)]
    size = ups[0].ByteSize()
    for start, start_size in starts:
        grows = start_size + 16  # the start's tag and length
        if ups[-1].starts and size + grows > max_bytes:
            ups.append(relay_pb2.RelayUp())
            size = 0
        ups[-1].starts.append(start)
        size += grows
    return ups


class _RelayCall:
    """One relay call and the streams started on it."""

    def __init__(
        self,
        stub: relay_pb2_grpc.WorkerRelayStub,
        address: str,
        on_end: Any,
        metadata: tuple[tuple[str, str], ...],
        max_message_bytes: int,
    ) -> None:
        self.address = address
        # RelayUp's own fields, a start's stream id and the message's tag and length: well under this.
        self.max_up_bytes = max_message_bytes - _RELAY_UP_OVERHEAD
        # The stubs' types know the synchronous API only: this is an aio stream-stream call.
        self.call: Any = cast(Any, stub.Relay)(metadata=metadata)
        self.inboxes: dict[int, _Inbox] = {}
        self.starts: list[tuple[Any, int]] = []  # with its serialized size, measured once
        self.cancels: list[int] = []
        self.ended = False
        self._pending = asyncio.Event()
        self._on_end = on_end
        loop = asyncio.get_running_loop()
        self._writer = loop.create_task(self._write())
        self._reader = loop.create_task(self._read())

    def start(self, stream_id: int, start: Any) -> _Inbox:
        inbox = self.inboxes[stream_id] = _Inbox()
        size = start.ByteSize()
        if size > self.max_up_bytes:
            # Sent, it would break the relay call, and with it every stream on it: refused alone.
            inbox.fail(
                _status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the request is {size} bytes; a request to a worker may be at most {self.max_up_bytes}",
                    request_id=start.request.request_id or "-",
                )
            )
            return inbox
        self.starts.append((start, size))
        self._pending.set()
        return inbox

    def cancel(self, stream_id: int) -> None:
        if self.inboxes.pop(stream_id, None) is not None and not self.ended:
            self.cancels.append(stream_id)
            self._pending.set()

    def finished(self, stream_id: int) -> None:
        self.inboxes.pop(stream_id, None)

    async def _write(self) -> None:
        # One writer, so writes never overlap; what gathers during a write goes in the next one.
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            # A write racing the refusal of a worker without the relay would turn its UNIMPLEMENTED
            # into INTERNAL; the worker's relay sends its metadata at once, an older worker its refusal.
            await self.call.initial_metadata()
            if self.call.done():
                return
            while True:
                await self._pending.wait()
                self._pending.clear()
                starts, cancels = self.starts, self.cancels
                self.starts, self.cancels = [], []
                for up in _packed(starts, cancels, self.max_up_bytes):
                    await self.call.write(up)

    async def _read(self) -> None:
        failure: BaseException
        try:
            async for down in self.call:
                for event in down.events:
                    inbox = self.inboxes.get(event.stream_id)
                    if inbox is not None:  # else cancelled here, its events already on the way
                        inbox.push(event)
                        if inbox.unread_tokens > MAX_UNREAD_TOKENS:
                            self._reader_gone(event.stream_id, inbox)
            failure = _status(grpc.StatusCode.UNAVAILABLE, f"worker {self.address} closed the relay")
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                failure = RelayUnsupported(f"worker {self.address} has no relay service")
            else:
                log.debug("relay to %s ended: %s", self.address, exc.code().name)
                failure = _status(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the relay to worker {self.address} broke: {exc.details() or exc.code().name}",
                )
        except asyncio.CancelledError:
            failure = _status(grpc.StatusCode.UNAVAILABLE, f"the relay to worker {self.address} was closed")
        except Exception as exc:  # a bug here must fail the streams, never leave them waiting
            log.exception("relay to %s failed", self.address)
            failure = _status(
                grpc.StatusCode.UNAVAILABLE, f"the relay to worker {self.address} failed: {exc}"
            )
        self.ended = True
        self._writer.cancel()
        self.call.cancel()
        for inbox in self.inboxes.values():
            inbox.fail(failure)
        self._on_end(self)

    def _reader_gone(self, stream_id: int, inbox: _Inbox) -> None:
        """The client stopped reading (its chunks pile up here, its HTTP/2 window full): stop the
        worker's generation, which would otherwise go on into this gateway's memory, holding KV blocks."""
        self.cancel(stream_id)
        inbox.fail(
            _status(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the stream was stopped: more than {MAX_UNREAD_TOKENS} of its tokens waited for the "
                "client to read them",
            )
        )

    async def close(self) -> None:
        self.call.cancel()
        for task in (self._reader, self._writer):
            task.cancel()
        await asyncio.gather(self._reader, self._writer, return_exceptions=True)


class WorkerLink:
    """Generate streams to one worker over its relay call (see the module docstring)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        address: str,
        metadata: Callable[[], tuple[tuple[str, str], ...]] = tuple,
        *,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        """`max_message_bytes` is the worker's receive limit (the services share theirs)."""
        self.metadata = metadata  # the gateway's credential, for each relay call it opens
        self.max_message_bytes = max_message_bytes
        self.address = address
        self.supported = True  # until the worker answers UNIMPLEMENTED
        self.calls_opened = 0
        self._stub = relay_pb2_grpc.WorkerRelayStub(channel)
        self._call: _RelayCall | None = None
        self._ids = itertools.count(1)

    def _ended(self, call: _RelayCall) -> None:
        if self._call is call:
            self._call = None

    async def stream(
        self,
        request: inference_pb2.GenerateRequest,
        timeout_s: float | None,
        trace_headers: Mapping[str, str],
    ) -> AsyncGenerator[Relayed]:
        """The stream's chunks; raises what its own Generate call would (an `AioRpcError`), or
        `RelayUnsupported` before any chunk when the worker has no relay."""
        if self._call is None:
            self._call = _RelayCall(
                self._stub, self.address, self._ended, self.metadata(), self.max_message_bytes
            )
            self.calls_opened += 1
        call = self._call
        stream_id = next(self._ids)
        start = relay_pb2.RelayStart(
            stream_id=stream_id, request=request, timeout_s=timeout_s or 0.0, trace_headers=trace_headers
        )
        inbox = call.start(stream_id, start)
        samples = request.sampling.n
        done = False  # the stream ended by itself, rather than its consumer leaving
        try:
            while True:
                events = await inbox.take()
                chunks = [e for e in events if e.chunk]
                if chunks and samples > 1:  # the samples' chunks interleave: never merged
                    for event in chunks:
                        yield Relayed(event.chunk, event.completion_tokens, event.prompt_tokens)
                elif chunks:
                    yield merge(chunks)
                end = events[-1] if events[-1].HasField("end") else None
                if end is not None:
                    done = True
                    if end.end.code:
                        raise _status(
                            _CODES.get(end.end.code, grpc.StatusCode.UNKNOWN),
                            end.end.message,
                            request_id=request.request_id or "-",
                            details=end.end.status_details,
                        )
                    return
        except RelayUnsupported:
            self.supported = False
            done = True
            raise
        except grpc.aio.AioRpcError:
            done = True
            raise
        finally:
            if done:
                call.finished(stream_id)
            else:  # the client left or ran out of time: the worker frees the request
                call.cancel(stream_id)

    async def close(self) -> None:
        if self._call is not None:
            await self._call.close()
            self._call = None
