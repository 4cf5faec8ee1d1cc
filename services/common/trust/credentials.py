"""Client side: the service token a service (or an operator's tool) presents on every call it makes.

`ServiceIdentity` holds a role and the minter of its tokens; `token_interceptors` put a token for the
called component into every call's metadata, so no call site can forget it. With mutual TLS the
client certificate carries the role instead, and no token is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc

from services.common.trust.roles import Role
from services.common.trust.tokens import TOKEN_METADATA_KEY, TokenMinter, load_secret


class CallerIdentity(Protocol):
    def metadata(self, audience: str, method: str = "") -> tuple[str, str]:
        """The metadata entry proving who calls `method` of `audience`."""
        ...


@dataclass(frozen=True)
class ServiceIdentity:
    """Who this process is when it calls another service."""

    role: Role
    minter: TokenMinter

    @classmethod
    def from_secret_file(cls, path: Path, role: Role) -> ServiceIdentity:
        return cls(role, TokenMinter(load_secret(path), role))

    def metadata(self, audience: str, method: str = "") -> tuple[str, str]:
        """The metadata entry carrying a token for `audience` (for call sites that pass metadata)."""
        return (TOKEN_METADATA_KEY, self.minter.token(audience))


def _with_token(details: grpc.aio.ClientCallDetails, entry: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*entry)
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TokenAdder:
    def __init__(self, identity: CallerIdentity, audience: str) -> None:
        self.identity = identity
        self.audience = audience

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        return _with_token(details, self.identity.metadata(self.audience, method))


class _UnaryUnary(_TokenAdder, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_TokenAdder, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_TokenAdder, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_TokenAdder, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def token_interceptors(identity: CallerIdentity, audience: str, *, client_streams: bool = True) -> list[Any]:
    """Interceptors adding `identity`'s token for `audience` (the component at the channel's other
    end) to every call. One per call shape: a grpc.aio channel files each interceptor under the first
    shape it implements only. `client_streams=False` leaves calls that stream requests alone: grpc.aio
    routes every write of an intercepted one through a queue and a task of its own, which a hot
    long-lived stream (the gateway's relay to a worker) should not pay; such a call passes
    `identity.metadata(audience)` itself."""
    kinds: tuple[type[_TokenAdder], ...] = (_UnaryUnary, _UnaryStream)
    if client_streams:
        kinds += (_StreamUnary, _StreamStream)
    return [kind(identity, audience) for kind in kinds]
