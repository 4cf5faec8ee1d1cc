"""Errors as the OpenAI API returns them: an `error` object and the HTTP status a client expects.

The gateway's errors are gRPC statuses (its own, or a worker's passed through with their details):
the status picks the HTTP code, a `BadRequest` detail names the parameter, a `RetryInfo` detail
becomes `Retry-After`. Field paths of the gRPC request are reported under the HTTP API's names.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from openlora.errors import status_hints
from starlette.responses import JSONResponse

from services.common.errors import ServiceError

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
# The gRPC request's field paths under the names the HTTP API uses.
_PARAM_NAMES = {
    "sampling.max_new_tokens": "max_tokens",
    "text": "prompt",
    "token_ids": "prompt",
    "adapter_ref.id": "model",
    "adapter_ref.version": "model",
    "adapter_ref": "model",
    "return_logprobs": "logprobs",
    "response_format.json_schema": "response_format.json_schema.schema",
    "response_format.regex": "regex",  # extra_body's
    "response_format.grammar": "grammar",
}


def http_param(field: str) -> str:
    if field in _PARAM_NAMES:
        return _PARAM_NAMES[field]
    if field.startswith("sampling."):
        return field.removeprefix("sampling.")
    if field.startswith("mix."):
        return field  # as given in extra_body's mix
    return field


def error_response(exc: ServiceError, request_id: str) -> JSONResponse:
    status, kind = _HTTP_STATUS.get(exc.code, (500, "server_error"))
    violations, retry_after = status_hints(exc.details())
    field = next(iter(violations), None)
    param = http_param(field) if field is not None else None
    message = exc.message
    if param is not None and field is not None and message.startswith(f"{field}: "):
        message = f"{param}: {message[len(field) + 2 :]}"
    headers = {"x-request-id": request_id}
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return JSONResponse(error_body(message, kind, param, exc.code.name.lower()), status, headers=headers)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def internal_error(request_id: str) -> JSONResponse:
    """Anything unexpected: no internals leak, the request id finds the log line."""
    return JSONResponse(
        error_body(f"internal error (request {request_id})", "server_error", None, "internal"),
        500,
        headers={"x-request-id": request_id},
    )
