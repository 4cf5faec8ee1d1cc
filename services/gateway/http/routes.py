"""The OpenAI-compatible routes: chat and text completions (streamed as SSE or whole), models, health.

Every route runs the gateway's own paths: the API key is checked by the gateway's authenticator, a
generation goes through `GatewayInference.Generate` (tenant limits, adapter access, routing, retries,
the relay), models come from a worker and the adapter store. Only the shapes differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from openlora.adapters import adapter_ref
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import inference_pb2
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.responses import JSONResponse, Response

from services.common.errors import InvalidArgument, NotFound, ServiceError
from services.common.request_checks import check_request_id
from services.gateway.auth import Authenticator
from services.gateway.http.call import HttpCall
from services.gateway.http.errors import error_body, error_response, internal_error
from services.gateway.http.render import Rendering
from services.gateway.http.schema import (
    ChatCompletionRequest,
    CompletionRequest,
    chat_request,
    completion_request,
)
from services.gateway.metrics import GatewayMetrics
from services.gateway.outcome import CallOutcome
from services.gateway.servicer import GatewayInference
from services.gateway.store_proxy import StoreProxy

REQUEST_ID_HEADER = "x-request-id"
BASE_MODEL_TTL_S = 30.0
MAX_MODELS_PAGE = 1000
DEFAULT_MODELS_PAGE = 100
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the response


class OpenAIFront:
    def __init__(
        self,
        inference: GatewayInference,
        authenticate: Authenticator,
        metrics: GatewayMetrics,
        store: StoreProxy | None,
        *,
        request_timeout_s: float | None,
    ) -> None:
        self.inference = inference
        self.authenticate = authenticate
        self.metrics = metrics
        self.store = store
        self.request_timeout_s = request_timeout_s
        self._base_model: tuple[inference_pb2.ListModelsResponse, float] | None = None

    async def base_model(self, call: HttpCall) -> inference_pb2.ListModelsResponse:
        """What the workers serve, asked again every `BASE_MODEL_TTL_S` (every worker serves one base)."""
        known = self._base_model
        if known is not None and time.monotonic() - known[1] < BASE_MODEL_TTL_S:
            return known[0]
        response = await self.inference.base_model(call.time_remaining())
        self._base_model = (response, time.monotonic())
        return response

    def call(self, request: Request, method: str = "http") -> HttpCall:
        return HttpCall(request.headers, self.request_timeout_s, method)

    async def generate(self, request: Request, body: ChatCompletionRequest | CompletionRequest) -> Response:
        chat = isinstance(body, ChatCompletionRequest)
        method = "http.chat.completions" if chat else "http.completions"
        request_id = request.state.request_id
        call = self.call(request, method)
        with contextlib.ExitStack() as refused:
            # Counted here only if refused before the relay, which counts every call it takes.
            outcome = refused.enter_context(CallOutcome(self.metrics, method, call))
            outcome.tenant = self.authenticate(call).tenant
            base = (await self.base_model(call)).base_model.name
            if isinstance(body, ChatCompletionRequest):
                message = chat_request(body, base)
            else:
                message = completion_request(body, base)
            message.request_id = request_id
            refused.pop_all()
        rendering = Rendering(request_id, body.model, chat, logprobs=message.return_logprobs)
        chunks = _Chunks(self.inference.Generate(message, call))
        # The first chunk before any byte of the response: a refusal (an unknown adapter, a limit)
        # is then an HTTP status, not an error event inside a 200 stream.
        first = await chunks.first()
        if body.stream:
            events = _sse(chunks, first, rendering, body.include_usage)
            return EventSourceResponse(events, sep="\n", headers={REQUEST_ID_HEADER: request_id})
        collected = await _until_disconnected(request, chunks.rest(first))
        if collected is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; for the access log
        return JSONResponse(rendering.response(collected), headers={REQUEST_ID_HEADER: request_id})

    async def list_models(self, request: Request, limit: int, page_token: str) -> dict[str, Any]:
        """The base model, then a page of the adapters the tenant may use (the store proxy's List:
        public ones and the tenant's own)."""
        call = self.call(request)
        self.authenticate(call)
        if not 1 <= limit <= MAX_MODELS_PAGE:
            raise InvalidArgument("limit", f"must be in [1, {MAX_MODELS_PAGE}]")
        data: list[dict[str, Any]] = []
        if not page_token:
            data.append(_base_object(await self.base_model(call)))
        next_token = ""
        if self.store is not None:
            asked = store_pb.ListAdaptersRequest(page_size=limit, page_token=page_token)
            page = await self.store.List(asked, call)
            data += [_adapter_object(info) for info in page.adapters]
            next_token = page.next_page_token
        return {
            "object": "list",
            "data": data,
            "has_more": bool(next_token),
            "next_page_token": next_token or None,
        }

    async def get_model(self, request: Request, model: str) -> dict[str, Any]:
        call = self.call(request)
        self.authenticate(call)
        base = await self.base_model(call)
        if model == base.base_model.name:
            return _base_object(base)
        if self.store is None:
            raise NotFound(f"model {model!r} not found")
        info = await self.store.Get(store_pb.GetAdapterRequest(adapter=adapter_ref(model)), call)
        return _adapter_object(info)


def _base_object(listing: inference_pb2.ListModelsResponse) -> dict[str, Any]:
    model = listing.base_model
    return {
        "id": model.name,
        "object": "model",
        "created": 0,
        "owned_by": "openlora",
        "root": model.name,
        "parent": None,
        "max_model_len": model.max_context,
    }


def _adapter_object(info: store_pb.AdapterInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "object": "model",
        "created": int(info.created_at.seconds) if info.HasField("created_at") else 0,
        "owned_by": info.owner,
        "root": info.base_model,
        "parent": info.base_model,
        "version": info.version,
    }


class _Chunks:
    """The relay's stream of serialized chunks, parsed; closed with the response."""

    def __init__(self, stream: AsyncIterator[bytes]) -> None:
        self.stream = stream

    async def first(self) -> inference_pb2.GenerateChunk:
        try:
            data = await anext(self.stream)
        except BaseException:
            await self.stream.aclose()  # type: ignore[attr-defined]
            raise
        return inference_pb2.GenerateChunk.FromString(data)

    async def rest(self, first: inference_pb2.GenerateChunk) -> AsyncIterator[inference_pb2.GenerateChunk]:
        async with contextlib.aclosing(self.stream):  # type: ignore[type-var]
            yield first
            async for data in self.stream:
                yield inference_pb2.GenerateChunk.FromString(data)


async def _sse(
    chunks: _Chunks, first: inference_pb2.GenerateChunk, rendering: Rendering, include_usage: bool
) -> AsyncIterator[ServerSentEvent]:
    usage = None
    try:
        async for chunk in chunks.rest(first):
            for event in rendering.stream_events(chunk):
                yield ServerSentEvent(json.dumps(event, separators=(",", ":")))
            if chunk.HasField("usage"):
                usage = chunk.usage
    except ServiceError as exc:
        # Headers are gone: the error travels as an event, as OpenAI-compatible servers send it.
        body = error_response(exc, rendering.request_id).body
        yield ServerSentEvent(bytes(body).decode())
    else:
        if include_usage and usage is not None:
            yield ServerSentEvent(json.dumps(rendering.usage_event(usage), separators=(",", ":")))
    yield ServerSentEvent("[DONE]")


async def _until_disconnected(
    request: Request, chunks: AsyncIterator[inference_pb2.GenerateChunk]
) -> list[inference_pb2.GenerateChunk] | None:
    """Every chunk of a non-streaming call; None, the request cancelled (its KV blocks freed on the
    worker), when the client hangs up first."""

    async def collect() -> list[inference_pb2.GenerateChunk]:
        return [chunk async for chunk in chunks]

    async def hang_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    collecting = asyncio.ensure_future(collect())
    watching = asyncio.ensure_future(hang_up())
    try:
        await asyncio.wait((collecting, watching), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
    if collecting.cancelled() or not collecting.done():
        return None
    return collecting.result()


def build_app(front: OpenAIFront) -> FastAPI:
    app = FastAPI(title="OpenLoRA", summary="OpenAI-compatible API of the OpenLoRA gateway", docs_url="/docs")

    @app.middleware("http")
    async def request_id(request: Request, call_next: Any) -> Response:
        given = request.headers.get(REQUEST_ID_HEADER, "")
        try:
            request.state.request_id = check_request_id(REQUEST_ID_HEADER, given) or uuid.uuid4().hex
        except ServiceError as exc:
            return JSONResponse(error_body(exc.message, "invalid_request_error", REQUEST_ID_HEADER), 400)
        response: Response = await call_next(request)
        response.headers.setdefault(REQUEST_ID_HEADER, request.state.request_id)
        return response

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> Response:
        return error_response(exc, request.state.request_id)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> Response:
        problem = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request body"}
        param = ".".join(str(part) for part in problem["loc"] if part != "body") or None
        message = f"{param}: {problem['msg']}" if param else str(problem["msg"])
        headers = {REQUEST_ID_HEADER: request.state.request_id}
        return JSONResponse(error_body(message, "invalid_request_error", param), 400, headers=headers)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        return internal_error(request.state.request_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await front.generate(request, body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await front.generate(request, body)

    @app.get("/v1/models")
    async def models(
        request: Request, limit: int = DEFAULT_MODELS_PAGE, page_token: str = ""
    ) -> dict[str, Any]:
        return await front.list_models(request, limit, page_token)

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        return await front.get_model(request, model)

    @app.get("/health")
    async def health() -> Response:
        healthy = front.inference.pool.any_healthy()
        return JSONResponse({"status": "ok" if healthy else "no worker"}, 200 if healthy else 503)

    return app
