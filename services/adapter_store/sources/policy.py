"""The operator's rules for what an import may fetch: hosts, private networks, size, time."""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument

FIELD = "source_uri"


@dataclass(frozen=True)
class FetchPolicy:
    allowed_hosts: tuple[str, ...] = ()
    allow_private_networks: bool = False
    file_roots: tuple[Path, ...] = ()
    max_bytes: int = 1 << 30
    timeout_s: float = 60.0

    def check_host(self, host: str) -> None:
        """Refuse hosts off the allow-list and, unless allowed, any that resolve to a non-public address."""
        host = host.lower().strip("[]")
        if not host:
            raise InvalidArgument(FIELD, "has no host")
        if self.allowed_hosts and not any(fnmatch.fnmatchcase(host, p.lower()) for p in self.allowed_hosts):
            raise InvalidArgument(FIELD, f"host {host!r} is not on this store's import allow-list")
        if self.allow_private_networks:
            return
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except socket.gaierror:
            raise InvalidArgument(FIELD, f"host {host!r} does not resolve") from None
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if not address.is_global or address.is_multicast:
                raise InvalidArgument(
                    FIELD,
                    f"host {host!r} resolves to {address}, a non-public address; imports may not reach "
                    "internal networks (operators can allow it with import_allow_private_networks)",
                )

    def check_file(self, path: Path) -> Path:
        resolved = path.resolve()
        if not any(
            resolved == root.resolve() or root.resolve() in resolved.parents for root in self.file_roots
        ):
            raise InvalidArgument(FIELD, f"{path} is outside the directories file imports may read")
        if not resolved.exists():
            raise InvalidArgument(FIELD, f"{path} does not exist")
        return resolved
