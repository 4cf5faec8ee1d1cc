"""`file:///path`: an adapter folder or archive on the store's own disk (only where the operator allows)."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

from services.adapter_store.bundle import ARCHIVE_SUFFIXES, refuse_pickle
from services.adapter_store.safetensors_file import FIELD as WEIGHTS
from services.adapter_store.sources import FetchedAdapter, SourceContext, suggest_id
from services.adapter_store.validation import CONFIG
from services.common.errors import InvalidArgument


class FileSource:
    def fetch(self, uri: str, dest: Path, context: SourceContext) -> FetchedAdapter:
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost"):
            raise InvalidArgument("source_uri", "file:// URIs name a local path (file:///dir)")
        path = context.policy.check_file(Path(unquote(parsed.path)))
        if path.is_file():
            refuse_pickle(path.name, "source_uri")
            if not path.name.lower().endswith(ARCHIVE_SUFFIXES):
                raise InvalidArgument("source_uri", "a file import names a folder or a .tar archive")
            return FetchedAdapter(
                {path.name: self._copy(path, dest, context)}, suggest_id(path.name.split(".")[0])
            )
        files = {}
        for name in (CONFIG, WEIGHTS):
            if not (path / name).is_file():
                if (path / "adapter_model.bin").exists():
                    refuse_pickle("adapter_model.bin", "source_uri")
                raise InvalidArgument("source_uri", f"{path} has no {name}")
            files[name] = self._copy(path / name, dest, context)
        return FetchedAdapter(files, suggest_id(path.name))

    @staticmethod
    def _copy(path: Path, dest: Path, context: SourceContext) -> Path:
        if path.stat().st_size > context.policy.max_bytes:
            raise InvalidArgument(
                "source_uri", f"{path.name} exceeds the {context.policy.max_bytes}-byte limit"
            )
        target = dest / path.name
        shutil.copyfile(path, target)
        return target
