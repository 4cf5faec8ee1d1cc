"""The server-side interceptor every service runs: request ids, error mapping, access log, draining.

For each application call it
- takes the caller's `x-request-id` metadata or assigns one, exposes it to logs, and returns it in the
  trailing metadata;
- turns a `ServiceError` into its status code (with google.rpc details), and any other exception
  into `INTERNAL` naming the request id: tracebacks go to the log, never to the client;
- writes one access-log record (method, code, duration, responses streamed);
- on the services other services call (worker, store, attribution), asks the `ServiceAuthorizer`
  whether the caller's role may call the method before the handler runs, and keeps the role in
  `caller_role` for the handler;
- refuses new calls with `UNAVAILABLE` once the server drains for shutdown, and counts calls in
  flight so the drain can wait for them.
Health and reflection calls are open to anyone and neither counted nor logged at INFO; nor is the
gateway's relay call (authorized like any other), which carries many streams and counts and logs each
of them itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, cast

import grpc

from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.common.log import request_id_var
from services.common.request_checks import is_valid_id
from services.common.trust.caller import ServiceAuthorizer, caller_role
from services.common.trust.roles import is_open

log = logging.getLogger("openlora.rpc")

REQUEST_ID_KEY = "x-request-id"
STATUS_DETAILS_KEY = "grpc-status-details-bin"
_UNCOUNTED_METHOD_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.", "/openlora.v1.WorkerRelay/")

Context = grpc.aio.ServicerContext[Any, Any]


class InflightCalls:
    """Counts application calls in flight and whether the server is draining."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def exit(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True if every call finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _incoming_request_id(context: Context) -> str:
    for key, value in context.invocation_metadata() or ():
        # One the ledger could not store is replaced: it may become a request's id downstream.
        if key == REQUEST_ID_KEY and isinstance(value, str) and is_valid_id(value):
            return value
    return uuid.uuid4().hex


def draining_refusal() -> Unavailable:
    """What a new call (or relayed stream) gets once the server drains for shutdown."""
    return Unavailable("server is shutting down; retry on another instance")


def error_status(exc: BaseException, method: str, request_id: str) -> tuple[grpc.StatusCode, str, bytes]:
    """What a handler's exception tells its caller: a `ServiceError` its code, message and serialized
    google.rpc status (with its details); anything else INTERNAL naming the request id, with the
    traceback going to the log and never to the caller."""
    if isinstance(exc, ServiceError):
        return exc.code, exc.message, exc.to_status().SerializeToString()
    log.error("unhandled error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (request id {request_id})", b""


def log_call(
    method: str,
    code: grpc.StatusCode,
    started: float,
    responses: int,
    *,
    level: int = logging.INFO,
    relayed: bool = False,
) -> None:
    """The access-log record of one call (or one stream on the gateway's relay call)."""
    extra: dict[str, object] = {
        "code": code.name,
        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
        "responses": responses,
    }
    if relayed:
        extra["relayed"] = True
    log.log(level, "rpc %s %s", method, code.name, extra=extra)


class _Call:
    """Bookkeeping of one intercepted call."""

    def __init__(
        self, method: str, context: Context, inflight: InflightCalls, authorizer: ServiceAuthorizer | None
    ) -> None:
        self.method = method
        self.context = context
        self.inflight = inflight
        self.authorizer = authorizer
        self.infra = method.startswith(_UNCOUNTED_METHOD_PREFIXES)
        self.request_id = _incoming_request_id(context)
        self.code = grpc.StatusCode.OK
        self.responses = 0
        self.started = time.perf_counter()
        self._token = request_id_var.set(self.request_id)
        self._counted = False
        context.set_trailing_metadata(((REQUEST_ID_KEY, self.request_id),))

    def admit(self) -> None:
        if self.authorizer is not None and not is_open(self.method):
            caller_role.set(self.authorizer.authorize(self.method, self.context))
        if self.infra:
            return
        if self.inflight.draining:
            raise draining_refusal()
        self.inflight.enter()
        self._counted = True

    async def fail(self, exc: BaseException) -> NoReturn:
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            self.code = grpc.StatusCode.CANCELLED
            raise exc
        if isinstance(exc, grpc.aio.AbortError):
            self.code = self.context.code() or grpc.StatusCode.UNKNOWN
            raise exc
        self.code, message, details = error_status(exc, self.method, self.request_id)
        trailing: tuple[tuple[str, str | bytes], ...] = ((REQUEST_ID_KEY, self.request_id),)
        if details:
            trailing += ((STATUS_DETAILS_KEY, details),)
        await self.context.abort(self.code, message, trailing_metadata=trailing)
        raise AssertionError("abort returned")  # abort always raises

    def end(self) -> None:
        if self._counted:
            self.inflight.exit()
        log_call(
            self.method,
            self.code,
            self.started,
            self.responses,
            level=logging.DEBUG if self.infra else logging.INFO,
        )
        # ValueError: finalised from another context (an abandoned stream); nothing to restore there.
        with contextlib.suppress(ValueError):
            request_id_var.reset(self._token)


class Undecodable:
    """What a request deserializer made of bytes that are not the method's message: the call then
    ends INVALID_ARGUMENT with the request id, rather than grpc's UNKNOWN or INTERNAL."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def error(self) -> InvalidArgument:
        return InvalidArgument("request", f"not a valid message of this method ({self.problem})")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:  # bytes passed through as they came
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, or whatever a custom deserializer raises
            return Undecodable(f"{type(exc).__name__}: {exc}"[:200])

    return deserialize


def _is_stream(request: Any) -> bool:
    """A client-streaming call's requests (an async iterator), not one message."""
    return hasattr(request, "__aiter__") and not hasattr(request, "SerializeToString")


def _decoded(request: Any) -> Any:
    if isinstance(request, Undecodable):
        raise request.error()
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _decoded(request)


UnaryBehavior = Callable[[Any, Context], Awaitable[Any]]
StreamBehavior = Callable[[Any, Context], Any]


class ServerCallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, inflight: InflightCalls, authorizer: ServiceAuthorizer | None = None) -> None:
        self.inflight = inflight
        self.authorizer = authorizer

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler: Any = await continuation(handler_call_details)  # typeshed types the sync behaviours only
        if handler is None:
            return None
        method = handler_call_details.method
        kwargs = {
            "request_deserializer": _tolerant(handler.request_deserializer),
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(self._unary(method, handler.unary_unary), **kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary(method, handler.stream_unary), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, handler.unary_stream), **kwargs
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, handler.stream_stream), **kwargs
            )
        return cast(grpc.RpcMethodHandler[Any, Any], handler)

    def _unary(self, method: str, behavior: UnaryBehavior) -> UnaryBehavior:
        async def wrapped(request: Any, context: Context) -> Any:
            call = _Call(method, context, self.inflight, self.authorizer)
            try:
                call.admit()
                if _is_stream(request):
                    request = _checked_stream(request)
                response = await behavior(_decoded(request), context)
                call.responses = 1
                return response
            except BaseException as exc:
                await call.fail(exc)
            finally:
                call.end()

        return wrapped

    def _streaming(
        self, method: str, behavior: StreamBehavior
    ) -> Callable[[Any, Context], AsyncIterator[Any]]:
        async def wrapped(request: Any, context: Context) -> AsyncIterator[Any]:
            call = _Call(method, context, self.inflight, self.authorizer)
            result = None
            try:
                call.admit()
                if _is_stream(request):
                    request = _checked_stream(request)
                result = behavior(_decoded(request), context)
                if inspect.isasyncgen(result):
                    async for response in result:
                        call.responses += 1
                        yield response
                else:  # a handler that writes with context.write() and returns None
                    await result
            except BaseException as exc:
                await call.fail(exc)
            finally:
                if inspect.isasyncgen(result):
                    await result.aclose()
                call.end()

        return wrapped
