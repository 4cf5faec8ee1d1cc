"""Channel and call metadata shared by the sync and asyncio clients."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from services.client.errors import REQUEST_ID_KEY

Metadata = tuple[tuple[str, str], ...]


def credentials(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> grpc.ChannelCredentials:
    """TLS trusting `ca_file` (system roots when None); a client certificate too for mTLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_file.read_bytes() if ca_file else None,
        private_key=key_file.read_bytes() if key_file else None,
        certificate_chain=cert_file.read_bytes() if cert_file else None,
    )


def call_metadata(api_key: str | None, request_id: str) -> Metadata:
    metadata: list[tuple[str, str]] = [(REQUEST_ID_KEY, request_id)]
    if api_key:
        metadata.append(("authorization", f"Bearer {api_key}"))
    return tuple(metadata)


class Deadline:
    """One deadline across every attempt of a call, so retries never extend what the caller allowed."""

    def __init__(self, timeout_s: float | None) -> None:
        self._end = None if timeout_s is None else time.monotonic() + timeout_s

    def remaining(self) -> float | None:
        return None if self._end is None else max(0.0, self._end - time.monotonic())

    def allows(self, delay_s: float) -> bool:
        left = self.remaining()
        return left is None or left > delay_s
