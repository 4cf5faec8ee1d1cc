"""The catalog: adapter manifests, base models and weight blobs, all kept in one blob backend.

Layout (every object written atomically):
    blobs/sha256/<digest>                  canonical adapter_model.safetensors, content-addressed
    adapters/<id>/<version>.json           immutable manifest of one version ('/' in ids stored as '~')
    refs/<digest>/<id>@<version>           marks a blob as used, so delete knows when to drop it
    base_models/<name>.json                shapes of a registered base model
A version's ref marker is written before its weights and manifest and removed after the manifest, and
both happen under a per-digest lock, so this process never deletes a blob a manifest points at. Several
store replicas on one bucket would need the same guarantee from the bucket (conditional writes); run one.
Manifests are immutable, so they are cached once read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from services.adapter_store.base_models import BaseModelSpec
from services.adapter_store.blobs import BlobBackend
from services.adapter_store.ids import id_from_key, id_key
from services.common.errors import InvalidArgument, NotFound

Manifest = dict[str, Any]


def blob_key(digest: str) -> str:
    return f"blobs/sha256/{digest}"


class Catalog:
    def __init__(self, blobs: BlobBackend) -> None:
        self.blobs = blobs
        self._manifests: dict[tuple[str, str], Manifest] = {}
        self._bases: dict[str, BaseModelSpec] = {}
        self._lock = threading.Lock()
        self._digest_locks: dict[str, threading.Lock] = {}

    # base models

    def put_base_model(self, spec: BaseModelSpec) -> None:
        self.blobs.put_bytes(f"base_models/{id_key(spec.name)}.json", spec.to_json())
        with self._lock:
            self._bases[spec.name] = spec

    def base_model(self, name: str) -> BaseModelSpec | None:
        with self._lock:
            cached = self._bases.get(name)
        if cached is not None:
            return cached
        try:
            spec = BaseModelSpec.from_json(self.blobs.get_bytes(f"base_models/{id_key(name)}.json"))
        except KeyError:
            return None
        with self._lock:
            self._bases[name] = spec
        return spec

    def base_models(self) -> list[BaseModelSpec]:
        names = [id_from_key(n.removesuffix(".json")) for n in self.blobs.list_children("base_models/")]
        return [spec for name in names if (spec := self.base_model(name)) is not None]

    # adapters

    def versions(self, adapter_id: str) -> list[str]:
        return [n.removesuffix(".json") for n in self.blobs.list_children(f"adapters/{id_key(adapter_id)}/")]

    def get(self, adapter_id: str, version: str = "") -> Manifest:
        """One version's manifest (the latest when version is empty); NotFound when absent."""
        if not version:
            versions = self.versions(adapter_id)
            if not versions:
                raise NotFound(f"adapter {adapter_id!r} not found")
            version = versions[-1]
        key = (adapter_id, version)
        with self._lock:
            cached = self._manifests.get(key)
        if cached is not None:
            return cached
        try:
            manifest: Manifest = json.loads(
                self.blobs.get_bytes(f"adapters/{id_key(adapter_id)}/{version}.json")
            )
        except KeyError:
            raise NotFound(f"adapter {adapter_id!r} version {version!r} not found") from None
        with self._lock:
            self._manifests[key] = manifest
        return manifest

    def _digest_lock(self, digest: str) -> threading.Lock:
        with self._lock:
            return self._digest_locks.setdefault(digest, threading.Lock())

    def put_version(self, manifest: Manifest, weights: Path) -> None:
        """Store a new version: its ref marker, its weights (unless already stored), then its manifest.

        Under the digest's lock, so a concurrent delete of another version with the same weights cannot
        drop the blob between our existence check and our manifest write.
        """
        adapter_id, version, digest = manifest["id"], manifest["version"], manifest["digest"]
        with self._digest_lock(digest):
            self.blobs.put_bytes(f"refs/{digest}/{id_key(adapter_id)}@{version}", b"")
            if not self.blobs.exists(blob_key(digest)):
                self.blobs.put_file(blob_key(digest), weights)
            self.blobs.put_bytes(
                f"adapters/{id_key(adapter_id)}/{version}.json", json.dumps(manifest, sort_keys=True).encode()
            )

    def ids(self, start_after: str = "") -> Iterator[str]:
        """Adapter ids in sorted order (of their storage keys), after start_after."""
        for segment in self.blobs.list_children("adapters/", id_key(start_after) if start_after else ""):
            yield id_from_key(segment)

    def delete(self, adapter_id: str, version: str = "") -> list[str]:
        """Delete one version, or all; drop weights no version uses any more. Returns the versions deleted."""
        targets = [version] if version else self.versions(adapter_id)
        if not targets:
            raise NotFound(f"adapter {adapter_id!r} not found")
        deleted = []
        for v in targets:
            manifest = self.get(adapter_id, v)
            digest = manifest["digest"]
            with self._digest_lock(digest):
                self.blobs.delete(f"adapters/{id_key(adapter_id)}/{v}.json")
                self.blobs.delete(f"refs/{digest}/{id_key(adapter_id)}@{v}")
                with self._lock:
                    self._manifests.pop((adapter_id, v), None)
                if not any(True for _ in self.blobs.list_keys(f"refs/{digest}/")):
                    self.blobs.delete(blob_key(digest))
            deleted.append(v)
        return deleted


def check_provenance(provenance: dict[str, Any], field: str = "provenance") -> None:
    """Contributors need ids and roles, shares in (0, 1] summing to 1."""
    contributors = provenance.get("contributors", [])
    seen = set()
    for i, c in enumerate(contributors):
        where = f"{field}.contributors[{i}]"
        if not c.get("id"):
            raise InvalidArgument(f"{where}.id", "must not be empty")
        if (c["id"], c.get("role")) in seen:
            raise InvalidArgument(f"{where}.id", f"{c['id']!r} is listed twice with the same role")
        seen.add((c["id"], c.get("role")))
        if c.get("role") not in ("TRAINER", "DATA"):
            raise InvalidArgument(f"{where}.role", "must be TRAINER or DATA")
        share = c.get("share")
        if not isinstance(share, int | float) or not 0 < share <= 1:
            raise InvalidArgument(f"{where}.share", f"must be in (0, 1], got {share!r}")
    if contributors and abs(sum(c["share"] for c in contributors) - 1.0) > 1e-9:
        total = sum(c["share"] for c in contributors)
        raise InvalidArgument(f"{field}.contributors", f"shares must sum to 1, they sum to {total:g}")
