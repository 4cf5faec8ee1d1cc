"""The local disk tier: downloaded adapter files, content-addressed by digest, under a byte budget.

Layout under `root`:
    <digest[:2]>/<digest>/adapter_config.json, adapter_model.safetensors   the store's canonical files
    <digest[:2]>/<digest>/refs.json                                        ["id@version", ...] naming it
    .staging/<random>/                                                     downloads in progress
An entry appears under its final name only complete (a rename of its staging folder), so a crash
leaves at worst a staging folder, removed at the next start. Recency is the entry folder's mtime,
so least-recently-used order survives restarts. An entry being read is never evicted; it goes when
its last reader is done, so the tier exceeds its budget by at most the entries being read.
Methods block on the file system: call them from a worker thread; one lock guards the index and
every rename or delete of an entry folder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from services.inference.adapter_cache.loaded import CONFIG_FILE, WEIGHTS_FILE

log = logging.getLogger("openlora.worker.adapter_cache")
REFS_FILE = "refs.json"
STAGING = ".staging"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class _Entry:
    size: int  # bytes of the two adapter files
    refs: set[str] = field(default_factory=set)


class DiskTier:
    def __init__(self, root: Path, budget_bytes: int) -> None:
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # digest -> entry, least recent first
        self._digest_of: dict[str, str] = {}  # "id@version" -> digest
        self._readers: Counter[str] = Counter()  # entries being read; eviction skips them
        self._bytes = 0
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def scan(self) -> None:
        """Index what earlier runs left on disk (oldest first), drop partial entries, fit the budget."""
        shutil.rmtree(self.root / STAGING, ignore_errors=True)
        found: list[tuple[float, str, _Entry]] = []
        for folder in self.root.glob("??/*"):
            digest = folder.name
            files = [folder / CONFIG_FILE, folder / WEIGHTS_FILE]
            named_right = _DIGEST.match(digest) is not None and folder.parent.name == digest[:2]
            if not named_right or not all(f.is_file() for f in files):
                log.warning("removing an incomplete adapter cache entry %s", folder)
                shutil.rmtree(folder, ignore_errors=True)
                continue
            entry = _Entry(sum(f.stat().st_size for f in files), _read_refs(folder))
            found.append((folder.stat().st_mtime, digest, entry))
        with self._lock:
            for _, digest, entry in sorted(found):
                self._add(digest, entry)
        self.evict_over_budget()
        log.info("adapter disk cache: %d entries, %d bytes", len(self._entries), self._bytes)

    def entries(self) -> list[tuple[str, str, int]]:
        """(key `id@version`, digest, bytes) of every adapter on disk, most recently used first."""
        with self._lock:
            return [
                (key, digest, entry.size)
                for digest, entry in reversed(self._entries.items())
                for key in sorted(entry.refs)
            ]

    def digest_of(self, key: str) -> str | None:
        with self._lock:
            return self._digest_of.get(key)

    def open_entry(self, digest: str) -> Path | None:
        """Mark an entry as being read (eviction leaves it alone) and most recently used."""
        with self._lock:
            if digest not in self._entries:
                return None
            self._readers[digest] += 1
            self._entries.move_to_end(digest)
        folder = self.path(digest)
        with contextlib.suppress(OSError):
            os.utime(folder)  # recency that outlives this process
        return folder

    def close_entry(self, digest: str) -> list[str]:
        """End a read; an entry that outlived an eviction because it was being read goes now."""
        with self._lock:
            self._readers[digest] -= 1
            if self._readers[digest] <= 0:
                del self._readers[digest]
            over = self._bytes > self.budget_bytes
        return self.evict_over_budget() if over else []

    def staging_dir(self) -> Path:
        folder = self.root / STAGING / uuid.uuid4().hex
        folder.mkdir(parents=True)
        return folder

    def commit(self, staged: Path, digest: str, key: str) -> list[str]:
        """Move a verified download into place under `digest`, remember `key`, fit the budget.

        When another download of the same digest got there first, `staged` is dropped instead.
        """
        final = self.path(digest)
        with self._lock:
            if digest not in self._entries:
                final.parent.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(final, ignore_errors=True)  # an unindexed leftover, never a live entry
                os.rename(staged, final)
                size = sum((final / name).stat().st_size for name in (CONFIG_FILE, WEIGHTS_FILE))
                self._add(digest, _Entry(size))
            self._entries.move_to_end(digest)
        shutil.rmtree(staged, ignore_errors=True)
        self.add_ref(digest, key)
        return self.evict_over_budget()

    def add_ref(self, digest: str, key: str) -> None:
        """Record that `key` names the entry, on disk too, so a restart can find it without the store."""
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or key in entry.refs:
                return
            entry.refs.add(key)
            self._digest_of[key] = digest
            refs = sorted(entry.refs)
            final = self.path(digest)
            tmp = final / f".{REFS_FILE}.{uuid.uuid4().hex}"
            try:
                tmp.write_text(json.dumps(refs))
                os.replace(tmp, final / REFS_FILE)
            except OSError as exc:  # only costs a store round trip after a restart
                log.warning("cannot record refs of adapter cache entry %s: %s", digest, exc)
                tmp.unlink(missing_ok=True)

    def remove(self, digest: str) -> None:
        """Drop an entry (its files failed their digest check)."""
        with self._lock:
            if self._forget(digest) is not None:
                shutil.rmtree(self.path(digest), ignore_errors=True)

    def evict_over_budget(self) -> list[str]:
        """Delete least recently used entries nobody is reading until the tier fits its budget."""
        victims: list[str] = []
        with self._lock:
            for digest in list(self._entries):
                if self._bytes <= self.budget_bytes:
                    break
                if self._readers.get(digest, 0) == 0:
                    self._forget(digest)
                    victims.append(digest)
                    # Under the lock: a concurrent commit of the same digest must not lose its files.
                    shutil.rmtree(self.path(digest), ignore_errors=True)
            self.evictions += len(victims)
        return victims

    def _add(self, digest: str, entry: _Entry) -> None:
        self._entries[digest] = entry
        self._bytes += entry.size
        for key in entry.refs:
            self._digest_of[key] = digest

    def _forget(self, digest: str) -> _Entry | None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._bytes -= entry.size
            for key in entry.refs:
                if self._digest_of.get(key) == digest:
                    del self._digest_of[key]
        return entry


def _read_refs(folder: Path) -> set[str]:
    try:
        refs = json.loads((folder / REFS_FILE).read_text())
    except (OSError, ValueError):
        return set()
    return {r for r in refs if isinstance(r, str)} if isinstance(refs, list) else set()
