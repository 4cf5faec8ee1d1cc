"""Where and how a client connects, and the metadata every call carries (shared by both clients)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from openlora.errors import REQUEST_ID_KEY

Metadata = tuple[tuple[str, str], ...]
DEFAULT_TARGET = "localhost:50051"
_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Connection:
    """A client's target, credentials and API key, each taken from the environment when not given:
    `OPENLORA_TARGET`, `OPENLORA_API_KEY`, `OPENLORA_TLS` (1/true: TLS with the system's CAs) and
    `OPENLORA_CA_FILE` (TLS trusting that CA bundle instead)."""

    target: str
    api_key: str | None
    credentials: grpc.ChannelCredentials | None
    """None: plaintext (a local cluster); otherwise TLS, with a client certificate for mutual TLS."""

    @classmethod
    def resolve(
        cls,
        target: str | None,
        api_key: str | None,
        tls: bool | None,
        ca_file: Path | None,
        cert_file: Path | None,
        key_file: Path | None,
    ) -> Connection:
        ca_file = ca_file or _path_from_env("OPENLORA_CA_FILE")
        if tls is None:
            tls = os.environ.get("OPENLORA_TLS", "").strip().lower() in _TRUE
        secure = tls or ca_file is not None or cert_file is not None
        return cls(
            target=target or os.environ.get("OPENLORA_TARGET") or DEFAULT_TARGET,
            api_key=api_key if api_key is not None else os.environ.get("OPENLORA_API_KEY") or None,
            credentials=credentials(ca_file, cert_file, key_file) if secure else None,
        )


def _path_from_env(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None


def credentials(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> grpc.ChannelCredentials:
    """TLS trusting `ca_file` (the system's roots when None); a client certificate too for mTLS."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("mutual TLS needs both cert_file and key_file")
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
