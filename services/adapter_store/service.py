"""The adapter store's domain logic, free of gRPC: ingest (upload or import), get, list, delete, download.

Ingest validates everything in a private temporary folder first; only a fully valid adapter reaches
the backend (weights blob, ref marker, then manifest), so a refused upload leaves nothing behind.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.adapter_store.base_models import BaseModelSpec, check_base_model_name, spec_from_config
from services.adapter_store.blobs import BlobBackend, LocalBlobs, S3Blobs
from services.adapter_store.bundle import unpack
from services.adapter_store.catalog import Catalog, Manifest, blob_key, check_provenance
from services.adapter_store.ids import check_id, check_version, new_version
from services.adapter_store.safetensors_file import write_canonical
from services.adapter_store.settings import StoreSettings
from services.adapter_store.sources import AdapterSource, SourceContext, load_sources, scheme_of
from services.adapter_store.sources.policy import FetchPolicy
from services.adapter_store.validation import CONFIG, validate
from services.common.errors import InvalidArgument, NotFound

log = logging.getLogger("openlora.store")
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass
class AdapterMeta:
    """What the caller says about an adapter, beside its files."""

    id: str = ""
    owner: str = ""
    visibility: str = "PRIVATE"
    provenance: dict[str, Any] = field(default_factory=dict)
    base_model: str = ""
    source_uri: str = ""


@dataclass(frozen=True)
class DownloadPlan:
    manifest: Manifest
    files: list[tuple[str, int, str]]  # (name, size, sha256), in stream order
    chunks: Callable[[], Iterator[bytes]]


def make_backend(settings: StoreSettings) -> BlobBackend:
    if settings.backend == "s3":
        return S3Blobs.from_settings(settings)
    return LocalBlobs(settings.local_dir)


def canonical_config_bytes(manifest: Manifest) -> bytes:
    return json.dumps(manifest["config"], indent=2, sort_keys=True).encode()


class AdapterStoreService:
    def __init__(self, settings: StoreSettings, blobs: BlobBackend | None = None) -> None:
        self.settings = settings
        self.blobs = blobs if blobs is not None else make_backend(settings)
        self.catalog = Catalog(self.blobs)
        self.sources: dict[str, AdapterSource] = load_sources(settings.import_schemes)
        self.policy = FetchPolicy(
            allowed_hosts=tuple(settings.import_allowed_hosts),
            allow_private_networks=settings.import_allow_private_networks,
            file_roots=tuple(settings.import_file_roots),
            max_bytes=settings.max_adapter_bytes,
            timeout_s=settings.import_timeout_s,
            proxy_url=settings.import_proxy_url,
        )

    # base models

    def register_base_model(self, name: str, config_json: str) -> BaseModelSpec:
        spec = spec_from_config(name, config_json)
        self.catalog.put_base_model(spec)
        log.info("registered base model %s", name, extra={"layers": spec.num_layers})
        return spec

    def base_models(self) -> list[BaseModelSpec]:
        return sorted(self.catalog.base_models(), key=lambda s: s.name)

    # ingest

    def ingest(self, meta: AdapterMeta, staged: dict[str, Path], workdir: Path) -> Manifest:
        """Validate staged files and store them as a new version of meta.id."""
        check_id(meta.id)
        check_provenance(meta.provenance)
        files = unpack(staged, workdir, self.settings.max_adapter_bytes)
        base_name = meta.base_model or self._base_model_from_config(files.config)
        check_base_model_name(base_name)
        base = self.catalog.base_model(base_name)
        if base is None:
            raise InvalidArgument(
                "base_model", f"{base_name!r} is not registered in this store; register it first"
            )
        adapter = validate(
            files.config,
            files.weights,
            base,
            max_rank=self.settings.max_rank,
            allowed_dtypes=self.settings.allowed_dtypes,
        )
        canonical = workdir / "canonical.safetensors"
        digest = write_canonical(files.weights, adapter.header, adapter.renames, canonical)
        manifest: Manifest = {
            "id": meta.id,
            "version": new_version(),
            "digest": digest,
            "base_model": base.name,
            "rank": adapter.rank,
            "alpha": adapter.alpha,
            "target_modules": adapter.target_modules,
            "size_bytes": canonical.stat().st_size,
            "owner": meta.owner,
            "visibility": meta.visibility if meta.visibility in ("PUBLIC", "PRIVATE") else "PRIVATE",
            "provenance": meta.provenance,
            "created_at": datetime.datetime.now(datetime.UTC).isoformat(),
            "source_uri": meta.source_uri,
            "config": adapter.config,
            "chat_template": files.chat_template,
        }
        self.catalog.put_version(manifest, canonical)
        log.info(
            "stored adapter %s@%s",
            meta.id,
            manifest["version"],
            extra={"digest": digest, "rank": adapter.rank},
        )
        return manifest

    @staticmethod
    def _base_model_from_config(config_raw: bytes) -> str:
        try:
            name = json.loads(config_raw).get("base_model_name_or_path") or ""
        except (ValueError, AttributeError, UnicodeDecodeError, RecursionError):
            raise InvalidArgument(CONFIG, "is not a valid JSON object") from None
        if not name:
            raise InvalidArgument("base_model", "not given, and adapter_config.json names none")
        return str(name)

    def import_adapter(self, uri: str, meta: AdapterMeta) -> Manifest:
        scheme = scheme_of(uri)
        source = self.sources.get(scheme)
        if source is None:
            raise InvalidArgument(
                "source_uri",
                f"scheme {scheme!r} is not enabled on this store "
                f"(enabled: {', '.join(sorted(self.sources)) or 'none'})",
            )
        context = SourceContext(
            self.policy, self._s3_client_factory(), tuple(self.settings.import_s3_buckets)
        )
        with tempfile.TemporaryDirectory(prefix="openlora-import-") as tmp:
            fetched_dir = Path(tmp) / "fetched"
            fetched_dir.mkdir()
            fetched = source.fetch(uri, fetched_dir, context)
            meta.id = meta.id or fetched.suggested_id
            meta.source_uri = uri
            return self.ingest(meta, fetched.files, Path(tmp))

    def _s3_client_factory(self) -> Callable[[], Any] | None:
        """A client for import sources, with the credentials configured for them (the store's own
        bucket credentials would let a tenant import whatever the store's identity may read)."""
        s = self.settings

        def make() -> Any:
            import boto3
            from botocore import UNSIGNED
            from botocore.config import Config

            anonymous = s.import_s3_access_key_id is None
            return boto3.client(
                "s3",
                endpoint_url=s.import_s3_endpoint_url,
                region_name=s.import_s3_region,
                aws_access_key_id=s.import_s3_access_key_id,
                aws_secret_access_key=s.import_s3_secret_access_key,
                config=Config(signature_version=UNSIGNED) if anonymous else None,
            )

        return make

    # read side

    def get(self, adapter_id: str, version: str = "") -> Manifest:
        check_id(adapter_id, "adapter.id")
        check_version(version, "adapter.version")
        return self.catalog.get(adapter_id, version)

    def list_adapters(
        self, *, base_model: str = "", owner: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[Manifest], str]:
        size = min(page_size or self.settings.page_size, self.settings.page_size)
        start_after = _decode_token(page_token)
        page: list[Manifest] = []
        last_seen = ""
        for adapter_id in self.catalog.ids(start_after):
            if len(page) == size:
                return page, _encode_token(last_seen)
            last_seen = adapter_id
            try:
                manifest = self.catalog.get(adapter_id)
            except NotFound:  # deleted between listing and reading
                continue
            if (base_model and manifest["base_model"] != base_model) or (
                owner and manifest["owner"] != owner
            ):
                continue
            page.append(manifest)
        return page, ""

    def delete(self, adapter_id: str, version: str = "") -> list[str]:
        check_id(adapter_id, "adapter.id")
        check_version(version, "adapter.version")
        deleted = self.catalog.delete(adapter_id, version)
        log.info("deleted adapter %s", adapter_id, extra={"versions": deleted})
        return deleted

    def download(self, adapter_id: str, version: str = "") -> DownloadPlan:
        manifest = self.get(adapter_id, version)
        config = canonical_config_bytes(manifest)
        files = [
            (CONFIG, len(config), hashlib.sha256(config).hexdigest()),
            (WEIGHTS_FILE, int(manifest["size_bytes"]), manifest["digest"]),
        ]
        chunk = self.settings.download_chunk_bytes

        def chunks() -> Iterator[bytes]:
            yield config
            yield from self.blobs.iter_chunks(blob_key(manifest["digest"]), chunk)

        return DownloadPlan(manifest, files, chunks)


def _encode_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(last_id.encode()).decode()


def _decode_token(token: str) -> str:
    if not token:
        return ""
    try:
        last_id = base64.urlsafe_b64decode(token.encode()).decode()
        return check_id(last_id, "page_token")
    except (binascii.Error, UnicodeDecodeError, ValueError, InvalidArgument):
        raise InvalidArgument("page_token", "is not a token this store issued") from None
