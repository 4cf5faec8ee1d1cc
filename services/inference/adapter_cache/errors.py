"""How fetch failures reach callers: always a `ServiceError` with the status Google APIs would use."""

from __future__ import annotations

import grpc

from services.common.errors import InvalidArgument, NotFound, ServiceError, Unavailable


class AdapterCorrupt(ServiceError):
    """The adapter's bytes do not match its digest (or do not parse): refused, never served."""

    code = grpc.StatusCode.DATA_LOSS


def store_error(exc: grpc.aio.AioRpcError, what: str, timeout_s: float) -> ServiceError:
    """Translate a failed store call about `what` (`id@version`) into the worker's own status."""
    code, details = exc.code(), exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"adapter {what} not found in the adapter store")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument("adapter", details)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return Unavailable(f"the adapter store did not answer for {what} within {timeout_s:g} s")
    # UNAVAILABLE and anything else the store answers: a dependency failed; another worker (or a
    # retry once the store is back) may succeed, so the caller may retry.
    return Unavailable(
        f"the adapter store failed for {what}: {code.name} {details}".rstrip(), retry_after_s=1.0
    )
