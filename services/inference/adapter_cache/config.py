"""Settings of the worker's adapter cache (host RAM and local disk tiers, and the store fetch)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1024 * 1024
GiB = 1024 * MiB


def _default_disk_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "openlora" / "adapters"


@dataclass(frozen=True)
class CacheConfig:
    """Budgets and timings of the adapter cache; checked at construction."""

    host_bytes: int = 4 * GiB
    """Host RAM budget for parsed adapters (float32 A and B, pinned on CUDA). Least recently used
    adapters that the running batch does not pin are evicted to stay under it."""

    disk_bytes: int = 32 * GiB
    """Local disk budget for downloaded adapter files (both files of each adapter counted)."""

    disk_dir: Path = field(default_factory=_default_disk_dir)
    """Directory of the disk tier, content-addressed `<digest[:2]>/<digest>/`; kept across restarts.
    One worker process per directory: the index of what is there lives in that process."""

    latest_ttl_s: float = 5.0
    """How long a resolved "latest" version (empty AdapterRef.version) is reused before asking the
    store's `Get` again. 0 asks every time; a stale answer is still used while the store is down."""

    download_timeout_s: float = 60.0
    """Deadline of one `Get` or `Download` call to the adapter store."""

    download_attempts: int = 2
    """Downloads tried per load when the bytes fail their digest check (a corrupt transfer)."""

    import_schemes: tuple[str, ...] = ()
    """Source URI schemes (`hf`, `s3`, `https`, ...) a request may name as its adapter id: the adapter
    is imported through the store's `Import` on first use (the store's own allow-list applies too),
    then cached and served like any stored adapter. Empty: only adapters already in the store."""

    load_samples: int = 1024
    """Load-time samples kept per source tier for `stats()` (a ring buffer, so memory stays flat)."""

    def __post_init__(self) -> None:
        if self.host_bytes <= 0 or self.disk_bytes <= 0:
            raise ValueError("host_bytes and disk_bytes must be positive")
        if self.latest_ttl_s < 0:
            raise ValueError("latest_ttl_s must not be negative")
        if self.download_timeout_s <= 0:
            raise ValueError("download_timeout_s must be positive")
        if self.download_attempts < 1:
            raise ValueError("download_attempts must be at least 1")
        if self.load_samples < 1:
            raise ValueError("load_samples must be at least 1")
        object.__setattr__(self, "disk_dir", Path(self.disk_dir))
