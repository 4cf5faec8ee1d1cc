"""Adapter ids and versions: what is accepted, and how they map to storage keys."""

from __future__ import annotations

import re
import secrets
import threading
import time

from services.common.errors import InvalidArgument

# One segment: lowercase alnum first, then alnum . _ - ; at most 128 characters.
_SEGMENT = r"[a-z0-9][a-z0-9._-]{0,127}"
_ID = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})?$")
_VERSION = re.compile(r"^v\d{17}-[0-9a-f]{6}$")


def check_id(adapter_id: str, field: str = "id") -> str:
    """Return the id if it is well formed (`name` or `owner/name`), else raise InvalidArgument."""
    if not adapter_id:
        raise InvalidArgument(field, "must not be empty")
    if not _ID.fullmatch(adapter_id) or ".." in adapter_id:
        shown = adapter_id.encode("unicode_escape").decode()[:80]
        raise InvalidArgument(
            field,
            f"{shown!r} is not a valid adapter id ([a-z0-9][a-z0-9._-]{{0,127}}, optionally owner/name)",
        )
    return adapter_id


def check_version(version: str, field: str = "version") -> str:
    if version and not _VERSION.fullmatch(version):
        raise InvalidArgument(field, f"{version[:80]!r} is not a version of this store")
    return version


_last_ms = 0
_version_lock = threading.Lock()


def new_version() -> str:
    """Time-ordered and unique: sorting versions as strings sorts them by creation.

    The millisecond stamp is strictly increasing within this process (two uploads in one millisecond
    get consecutive stamps), and the random suffix keeps versions unique across processes.
    """
    global _last_ms
    with _version_lock:
        _last_ms = max(int(time.time() * 1000), _last_ms + 1)
        now_ms = _last_ms
    stamp = time.strftime("%Y%m%d%H%M%S", time.gmtime(now_ms // 1000)) + f"{now_ms % 1000:03d}"
    return f"v{stamp}-{secrets.token_hex(3)}"


def id_key(adapter_id: str) -> str:
    """The id as one storage-key segment ('~' never occurs in an id, '/' would nest)."""
    return adapter_id.replace("/", "~")


def id_from_key(segment: str) -> str:
    return segment.replace("~", "/")
