"""Errors from a worker or the store, handed to the gateway's client with their code and details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2

from services.common.errors import ServiceError
from services.common.interceptors import STATUS_DETAILS_KEY


def status_details(exc: grpc.aio.AioRpcError) -> list[any_pb2.Any]:
    """The google.rpc details (BadRequest, RetryInfo, ...) an upstream error carried."""
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            try:
                return list(status_pb2.Status.FromString(value).details)
            except ValueError:
                return []
    return []


class UpstreamError(ServiceError):
    """An upstream status passed through as is: the client sees what the worker or store said."""

    def __init__(self, exc: grpc.aio.AioRpcError) -> None:
        super().__init__(exc.details() or exc.code().name.lower())
        self.code = exc.code()
        self._details = status_details(exc)

    def details(self) -> list[any_pb2.Any]:
        return self._details
