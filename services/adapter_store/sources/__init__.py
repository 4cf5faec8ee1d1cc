"""Import sources: plugins that fetch an adapter's files from a URI into a local folder.

A source is any class with a `fetch(uri, dest, context)` method, registered under the Python entry-point
group `openlora.adapter_sources` with the URI scheme as its name. The store picks the plugin by scheme,
so a hosted-adapter platform or an in-house registry is added by installing a package that declares

    [project.entry-points."openlora.adapter_sources"]
    acme = "acme_openlora:AcmeSource"

and adding `acme` to OPENLORA_STORE_IMPORT_SCHEMES. What a source fetches is validated exactly like
an upload; the source only moves bytes and must respect the context's policy (hosts, size, timeout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from services.adapter_store.sources.policy import FetchPolicy
from services.common.errors import InvalidArgument

ENTRY_POINT_GROUP = "openlora.adapter_sources"


@dataclass(frozen=True)
class SourceContext:
    policy: FetchPolicy
    s3_client_factory: object | None = None  # () -> boto3 client, for s3:// sources
    s3_buckets: tuple[str, ...] = ()  # bucket patterns s3:// sources may read


@dataclass
class FetchedAdapter:
    files: dict[str, Path]  # staged files: one archive, or adapter_config.json + adapter_model.safetensors
    suggested_id: str
    extra: dict[str, str] = field(default_factory=dict)


class AdapterSource(Protocol):
    def fetch(self, uri: str, dest: Path, context: SourceContext) -> FetchedAdapter: ...


def scheme_of(uri: str) -> str:
    match = re.match(r"^([a-z][a-z0-9+.-]*)://", uri)
    if match is None:
        raise InvalidArgument("source_uri", f"{uri[:100]!r} is not a URI (hf://, s3://, https://, ...)")
    return match.group(1)


def load_sources(enabled: list[str]) -> dict[str, AdapterSource]:
    """Instantiate the registered sources whose scheme the operator enabled."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    sources: dict[str, AdapterSource] = {}
    for scheme in enabled:
        if scheme not in found:
            raise ValueError(
                f"no import source is registered for scheme {scheme!r} (known: {', '.join(sorted(found))})"
            )
        sources[scheme] = found[scheme].load()()
    return sources


def suggest_id(text: str) -> str:
    """A valid adapter id from a repo name or path ('Org/My_Repo' -> 'org/my_repo')."""
    parts = [re.sub(r"[^a-z0-9._-]+", "-", p.lower()).strip("-._") for p in text.split("/") if p]
    parts = [p[:128] for p in parts if p][-2:]
    return "/".join(parts) or "imported"
