"""`OpenLoRAError`: a failed call as one exception with its status code and the server's details."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

REQUEST_ID_KEY = "x-request-id"
_DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class OpenLoRAError(Exception):
    code: grpc.StatusCode
    message: str
    request_id: str = ""
    field_violations: dict[str, str] = field(default_factory=dict)
    """Field path → problem, for `INVALID_ARGUMENT` (google.rpc.BadRequest)."""
    retry_after_s: float | None = None
    """The server's hint (google.rpc.RetryInfo) for `RESOURCE_EXHAUSTED` and `UNAVAILABLE`."""

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.code.name}: {self.message}{where}"

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> OpenLoRAError:
        """Both the sync and the asyncio flavours of a failed call carry code, details and trailers."""
        call: Any = error  # grpc's stubs type RpcError without the Call methods both flavours have
        result = cls(code=call.code(), message=call.details() or "")
        trailers: Iterable[tuple[str, str | bytes]] = call.trailing_metadata() or ()
        for key, value in trailers:
            if key == REQUEST_ID_KEY and isinstance(value, str):
                result.request_id = value
            elif key == _DETAILS_KEY and isinstance(value, bytes):
                result._read_details(value)
        return result

    def _read_details(self, raw: bytes) -> None:
        violations, retry_after_s = status_hints(status_pb2.Status.FromString(raw).details)
        self.field_violations.update(violations)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


def status_hints(details: Iterable[any_pb2.Any]) -> tuple[dict[str, str], float | None]:
    """What a status's details tell a client: field path → problem (google.rpc.BadRequest, in the
    server's order) and the seconds to wait before retrying (google.rpc.RetryInfo), if given."""
    violations: dict[str, str] = {}
    retry_after_s: float | None = None
    for detail in details:
        bad_request = error_details_pb2.BadRequest()
        retry_info = error_details_pb2.RetryInfo()
        if detail.Unpack(bad_request):
            for violation in bad_request.field_violations:
                violations[violation.field] = violation.description
        elif detail.Unpack(retry_info):
            retry_after_s = retry_info.retry_delay.ToTimedelta().total_seconds()
    return violations, retry_after_s
