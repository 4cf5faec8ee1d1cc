"""Domain errors that map onto gRPC status codes the way Google APIs use them.

Service code raises these; the server kit's interceptor turns them into a status with a clear message
and, where it helps a client, a machine-readable detail (`BadRequest` naming the field, `RetryInfo`).
Anything else that escapes a handler becomes `INTERNAL` with the request id and no traceback text.
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

# Status messages travel in trailing metadata, which grpc caps at 16 KiB (percent-encoded, so a
# non-ASCII character can take 12 bytes): a message that echoes a huge field value would replace the
# whole status with RESOURCE_EXHAUSTED "metadata size exceeds hard limit". Both halves are clipped.
_MAX_MESSAGE_CHARS = 500
_MAX_FIELD_CHARS = 120


def clip(text: str, limit: int = _MAX_MESSAGE_CHARS) -> str:
    """`text`, cut to `limit` characters with a mark saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 24]}… ({len(text) - limit + 24} more)"


class ServiceError(Exception):
    """An error meant for the client: its message is sent as the status details."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        message = clip(message)
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        """Rich status details (google.rpc.*) sent alongside the message."""
        return []

    def to_status(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        status.details.extend(self.details())
        return status


class InvalidArgument(ServiceError):
    """The request is malformed; `field` names the offending field (dotted path)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        field = clip(field, _MAX_FIELD_CHARS)
        problem = clip(problem, _MAX_MESSAGE_CHARS - len(field) - 2)
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.problem)
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [packed]


class NotFound(ServiceError):
    """The named resource does not exist, or the caller may not know that it does."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The system is not in a state the request needs (e.g. the adapter is for another base model)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class _Retryable(ServiceError):
    """An error the client may retry after `retry_after_s`, sent as google.rpc.RetryInfo."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def details(self) -> list[any_pb2.Any]:
        if self.retry_after_s is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(self.retry_after_s * 1e9))
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        return [packed]


class ResourceExhausted(_Retryable):
    """A quota or limit was hit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(_Retryable):
    """A dependency is down or the server is shutting down; safe to retry elsewhere."""

    code = grpc.StatusCode.UNAVAILABLE
