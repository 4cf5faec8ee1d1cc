"""API keys: stored as sha256 hashes, each mapped to a tenant; per-tenant limits next to them.

The key file (or the `OPENLORA_GATEWAY_API_KEYS` env value, or a Kubernetes Secret mounted as a file)
is JSON:

    {
      "tenants": {"acme": {"max_concurrent_streams": 8, "tokens_per_minute": 60000}},
      "keys": [
        {"sha256": "<hex sha256 of the key>", "tenant": "acme", "name": "ci"},
        {"sha256": "<hex>", "tenant": "acme", "name": "old laptop", "revoked": true}
      ]
    }

Only hashes are stored: the keys are long random strings (`new_key()`), so a plain sha256 cannot be
reversed by guessing, and a lookup by hash never compares secrets byte by byte. A revoked key stays
listed so its holder is told it was revoked rather than that it never existed.

`python -m services.gateway.keys new TENANT` prints a fresh key and the entry to add for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.common.errors import PermissionDenied, Unauthenticated

log = logging.getLogger("openlora.gateway.keys")

KEY_PREFIX = "olk_"
# A tenant is an adapter owner, and `tenant/name` an adapter id: same alphabet as an id segment.
_TENANT = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def new_key() -> str:
    """A fresh API key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class TenantLimits:
    max_concurrent_streams: int
    tokens_per_minute: int  # 0: unlimited


@dataclass(frozen=True)
class KeyEntry:
    tenant: str
    name: str
    revoked: bool


@dataclass(frozen=True)
class KeyRing:
    """Key hash -> entry, and tenant -> its own limits (tenants without an entry use the defaults)."""

    keys: dict[str, KeyEntry]
    limits: dict[str, TenantLimits]

    @classmethod
    def empty(cls) -> KeyRing:
        return cls({}, {})

    def authenticate(self, key: str) -> KeyEntry:
        entry = self.keys.get(hash_key(key))
        if entry is None:
            raise Unauthenticated("API key not recognised")
        if entry.revoked:
            raise PermissionDenied(f"API key {entry.name!r} of tenant {entry.tenant!r} has been revoked")
        return entry

    def merged(self, other: KeyRing) -> KeyRing:
        return KeyRing({**self.keys, **other.keys}, {**self.limits, **other.limits})


def parse_key_ring(text: str, defaults: TenantLimits, source: str) -> KeyRing:
    """Parse the JSON document; ValueError naming `source` and the bad entry when malformed."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{source}: expected an object with 'keys' (and optionally 'tenants')")
    keys: dict[str, KeyEntry] = {}
    for index, raw in enumerate(_list(document.get("keys", []), f"{source}: keys")):
        where = f"{source}: keys[{index}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object")
        digest = str(raw.get("sha256", "")).lower()
        if not _SHA256.fullmatch(digest):
            raise ValueError(f"{where}: sha256 must be 64 hex digits (the hash of the key, not the key)")
        keys[digest] = KeyEntry(
            tenant=_tenant(raw.get("tenant"), where),
            name=str(raw.get("name", digest[:8])),
            revoked=bool(raw.get("revoked", False)),
        )
    limits: dict[str, TenantLimits] = {}
    tenants = document.get("tenants", {})
    if not isinstance(tenants, dict):
        raise ValueError(f"{source}: tenants must be an object of tenant -> limits")
    for tenant, raw in tenants.items():
        where = f"{source}: tenants.{tenant}"
        _tenant(tenant, where)
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object")
        limits[tenant] = TenantLimits(
            max_concurrent_streams=_count(
                raw.get("max_concurrent_streams", defaults.max_concurrent_streams), where, minimum=1
            ),
            tokens_per_minute=_count(raw.get("tokens_per_minute", defaults.tokens_per_minute), where),
        )
    return KeyRing(keys, limits)


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{where}: expected a list")
    return value


def _tenant(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _TENANT.fullmatch(value):
        raise ValueError(f"{where}: tenant must match [a-z0-9][a-z0-9._-]{{0,127}}, got {value!r}")
    return value


def _count(value: Any, where: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{where}: limits must be integers >= {minimum}, got {value!r}")
    return value


class KeySource:
    """The current key ring: inline JSON plus a file re-read when its modification time changes.

    A file that turns invalid keeps the last good ring (logged), so a bad edit never locks every
    tenant out; at start-up an invalid file or value is an error. A file deleted or emptied holds no
    keys: that is how an operator revokes them all at once, and its keys stop working at the next
    check.
    """

    def __init__(
        self,
        defaults: TenantLimits,
        *,
        path: Path | None = None,
        inline: str | None = None,
        reload_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.defaults = defaults
        self.path = path
        self.reload_s = reload_s
        self.clock = clock
        self._inline = parse_key_ring(inline, defaults, "api_keys") if inline else KeyRing.empty()
        self._stamp: tuple[int, int] | None = None
        self._checked_at = clock()
        self._ring = self._inline
        if path is not None:
            self._ring = self._read_file()

    @property
    def ring(self) -> KeyRing:
        if self.path is not None and self.clock() - self._checked_at >= self.reload_s:
            self._checked_at = self.clock()
            self._maybe_reload()
        return self._ring

    def authenticate(self, key: str) -> KeyEntry:
        return self.ring.authenticate(key)

    def limits_of(self, tenant: str) -> TenantLimits:
        return self.ring.limits.get(tenant, self.defaults)

    def _file_stamp(self) -> tuple[int, int]:
        assert self.path is not None
        stat = self.path.stat()
        return stat.st_mtime_ns, stat.st_size

    def _read_file(self) -> KeyRing:
        assert self.path is not None
        self._stamp = self._file_stamp()
        text = self.path.read_text()
        if not text.strip():
            return self._inline
        return self._inline.merged(parse_key_ring(text, self.defaults, str(self.path)))

    def _maybe_reload(self) -> None:
        assert self.path is not None
        try:
            if self._file_stamp() == self._stamp:
                return
            self._ring = self._read_file()
            if len(self._ring.keys) == len(self._inline.keys):
                log.warning("API key file %s is empty: only inline keys work now", self.path)
            log.info("API keys reloaded", extra={"keys": len(self._ring.keys)})
        except FileNotFoundError:
            if self._stamp is not None:
                log.warning("API key file %s is gone: its keys no longer work", self.path)
            self._stamp = None
            self._ring = self._inline
        except (OSError, ValueError) as exc:
            log.error("API key file not reloaded; keeping the previous keys: %s", exc)


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "new":
        print("usage: python -m services.gateway.keys new TENANT", file=sys.stderr)
        return 2
    tenant = _tenant(argv[1], "TENANT")
    key = new_key()
    print(f"key (give it to the tenant; it is not stored): {key}")
    print("entry for the key file:", json.dumps({"sha256": hash_key(key), "tenant": tenant, "name": "new"}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
