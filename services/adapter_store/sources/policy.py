"""The operator's rules for what an import may fetch: hosts, private networks, size, time.

A host is checked where it is connected to: `connect` resolves it once, refuses it when any of its
addresses is not public (`addresses.is_public`, which also unwraps IPv4 written inside IPv6: NAT64,
6to4, Teredo, mapped), and connects to an address from that same answer. `check_host` runs the same
check up front, for a clear error before any download starts. Through an operator's egress proxy
(`proxy_url`) only the up-front check is the store's; the proxy makes the connection.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from services.adapter_store.sources.addresses import is_public
from services.common.errors import InvalidArgument

FIELD = "source_uri"


def system_resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (one lookup)."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)]


# Module attributes looked up at call time, so a test can stand in for DNS and the network.
open_socket = socket.create_connection


@dataclass(frozen=True)
class FetchPolicy:
    allowed_hosts: tuple[str, ...] = ()
    allow_private_networks: bool = False
    file_roots: tuple[Path, ...] = ()
    max_bytes: int = 1 << 30
    timeout_s: float = 60.0
    proxy_url: str | None = None  # the operator's egress proxy: connected to as configured

    @property
    def proxy_address(self) -> tuple[str, int] | None:
        if self.proxy_url is None:
            return None
        parsed = urlparse(self.proxy_url)
        return (parsed.hostname or "", parsed.port or 80)

    def checked_addresses(self, host: str, port: int = 0) -> list[str]:
        """The addresses of `host` an import may connect to: all of one lookup, or InvalidArgument."""
        host = self._allowed(host)
        try:
            addresses = system_resolve(host, port)
        except (socket.gaierror, UnicodeError):
            addresses = []
        if not addresses:
            raise InvalidArgument(FIELD, f"host {host!r} does not resolve")
        if not self.allow_private_networks:
            for text in addresses:
                address = ipaddress.ip_address(text.split("%", 1)[0])
                if not is_public(address):
                    raise InvalidArgument(
                        FIELD,
                        f"host {host!r} resolves to {address}, a non-public address; imports may not "
                        "reach internal networks (operators can allow it with import_allow_private_networks)",
                    )
        return addresses

    def check_host(self, host: str) -> None:
        """Refuse hosts off the allow-list and, unless allowed, any that resolve to a non-public
        address (up front; `connect` checks again, on the lookup it connects with)."""
        if self.allow_private_networks:
            self._allowed(host)
        else:
            self.checked_addresses(host)

    def _allowed(self, host: str) -> str:
        host = host.lower().strip("[]")
        if not host:
            raise InvalidArgument(FIELD, "has no host")
        if self.allowed_hosts and not any(fnmatch.fnmatchcase(host, p.lower()) for p in self.allowed_hosts):
            raise InvalidArgument(FIELD, f"host {host!r} is not on this store's import allow-list")
        return host

    def connect(self, address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        """A socket to `address`'s host at an address checked by this very lookup (http.client's
        `_create_connection`): no second resolution a rebinding DNS server could answer differently."""
        host, port = address
        if (host, port) == self.proxy_address:  # the operator's own proxy, wherever it sits
            return open_socket(address, *args, **kwargs)
        failure: OSError | None = None
        for checked in self.checked_addresses(host, port):
            try:
                return open_socket((checked, port), *args, **kwargs)
            except OSError as exc:
                failure = exc
        assert failure is not None
        raise failure

    def check_file(self, path: Path) -> Path:
        resolved = path.resolve()
        if not any(
            resolved == root.resolve() or root.resolve() in resolved.parents for root in self.file_roots
        ):
            raise InvalidArgument(FIELD, f"{path} is outside the directories file imports may read")
        if not resolved.exists():
            raise InvalidArgument(FIELD, f"{path} does not exist")
        return resolved
