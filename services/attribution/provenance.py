"""Who is credited for each adapter version: pushed registrations, else the adapter store.

Resolution order for an (adapter_id, version) the ledger meets: the in-memory cache, the provenance
table (pushed registrations and earlier store answers), then the adapter store's `Get`, whose answer
is stored so it is asked once per version. A version's provenance never changes once recorded.

An adapter the store does not know (or with no store configured) is credited to nobody: its money
goes to the unattributed ledger line rather than blocking usage. A store that is down refuses the
batch with UNAVAILABLE, so the worker keeps it spooled and resends it later.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Protocol

import grpc
from openlora.v1 import adapter_store_pb2, adapter_store_pb2_grpc, common_pb2
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from services.attribution import validation
from services.attribution.domain import Contributor, Provenance, Role
from services.attribution.models import ProvenanceContributor, ProvenanceRow
from services.common.errors import AlreadyExists, InvalidArgument, ServiceError, Unavailable

log = logging.getLogger("openlora.attribution.provenance")

AdapterKey = tuple[str, str]  # (adapter_id, version as sent; '' = latest)

# How long "latest version of X" and "the store does not know X" are trusted before asking again.
RECHECK_AFTER_S = 30.0


class ProvenanceSource(Protocol):
    """Where provenance comes from when nobody pushed it (the adapter store)."""

    async def fetch(self, adapter_id: str, version: str) -> Provenance | None:
        """The provenance of a version ('' = latest, resolved); None if the adapter is unknown.
        Raises `Unavailable` when the source cannot answer now."""
        ...


class StoreProvenanceSource:
    """Asks the adapter store's `AdapterStore.Get`."""

    def __init__(self, channel: grpc.aio.Channel, timeout_s: float) -> None:
        self.stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        self.timeout_s = timeout_s

    async def fetch(self, adapter_id: str, version: str) -> Provenance | None:
        request = adapter_store_pb2.GetAdapterRequest(
            adapter=common_pb2.AdapterRef(id=adapter_id, version=version)
        )
        try:
            info = await self.stub.Get(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
                return None
            raise Unavailable(
                f"adapter store cannot tell the provenance of {adapter_id}: {exc.code().name}",
                retry_after_s=1.0,
            ) from exc
        try:
            return validation.provenance("provenance", info.id or adapter_id, info.version, info.provenance)
        except InvalidArgument as exc:
            # The store should have refused it; crediting nobody beats blocking this adapter's usage.
            log.warning("adapter store sent unusable provenance for %s@%s: %s", adapter_id, info.version, exc)
            return Provenance(info.id or adapter_id, info.version, info.provenance.trainer, (), ())


class ProvenanceRegistry:
    """Cache and table of provenance, filled by pushes and by a `ProvenanceSource`."""

    def __init__(self, engine: Engine, source: ProvenanceSource | None = None) -> None:
        self.engine = engine
        self.source = source
        self._by_version: dict[AdapterKey, Provenance] = {}  # immutable once known: cached forever
        self._recheck: dict[AdapterKey, tuple[float, Provenance]] = {}  # latest / unknown, for a while
        self._fetching: dict[AdapterKey, asyncio.Task[Provenance]] = {}

    def register(self, prov: Provenance, source: str = "push") -> bool:
        """Record `prov` (blocking); True if new, False if the same was already there."""
        if not prov.version:
            raise InvalidArgument("adapter.version", "must be set: provenance is recorded per version")
        if not self._insert(prov, source):
            existing = self._load(prov.adapter_id, prov.version)
            if existing is None or not _same(existing, prov):
                raise AlreadyExists(f"{prov.adapter_id}@{prov.version} already has a different provenance")
            return False
        self._by_version[(prov.adapter_id, prov.version)] = prov
        self._recheck.pop((prov.adapter_id, ""), None)  # "latest" may have moved
        return True

    def _insert(self, prov: Provenance, source: str) -> bool:
        insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert
        with self.engine.begin() as conn:
            result = conn.execute(
                insert(ProvenanceRow)
                .values(
                    adapter_id=prov.adapter_id,
                    version=prov.version,
                    trainer=prov.trainer,
                    datasets=json.dumps(list(prov.datasets)),
                    source=source,
                    registered_us=time.time_ns() // 1000,
                )
                .on_conflict_do_nothing()
                .returning(ProvenanceRow.adapter_id)
            )
            if result.first() is None:  # already there (perhaps a concurrent registration)
                return False
            if prov.contributors:
                conn.execute(
                    insert(ProvenanceContributor),
                    [
                        {
                            "adapter_id": prov.adapter_id,
                            "version": prov.version,
                            "contributor_id": c.contributor_id,
                            "role": int(c.role),
                            "share_micros": c.share_micros,
                        }
                        for c in prov.contributors
                    ],
                )
        return True

    async def resolve(self, keys: Iterable[AdapterKey]) -> dict[AdapterKey, Provenance]:
        """Provenance of every key; raises `Unavailable` when the store is needed and down."""
        now = time.monotonic()
        found: dict[AdapterKey, Provenance] = {}
        missing: list[AdapterKey] = []
        for key in set(keys):
            cached = self._by_version.get(key)
            if cached is None:
                recheck = self._recheck.get(key)
                if recheck is not None and recheck[0] > now:
                    cached = recheck[1]
            if cached is None:
                missing.append(key)
            else:
                found[key] = cached
        if missing:
            results = await asyncio.gather(*(self._fetch_once(key) for key in missing))
            found.update(zip(missing, results, strict=True))
        return found

    def _fetch_once(self, key: AdapterKey) -> asyncio.Task[Provenance]:
        # Many streams meeting one new adapter at once make one lookup, not one each.
        task = self._fetching.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(key))
            self._fetching[key] = task
            task.add_done_callback(lambda _t: self._fetching.pop(key, None))
        return task

    async def _fetch(self, key: AdapterKey) -> Provenance:
        adapter_id, version = key
        stored = await asyncio.to_thread(self._load, adapter_id, version)
        if stored is not None and version:
            self._by_version[key] = stored
            return stored
        fetched = await self.source.fetch(adapter_id, version) if self.source is not None else None
        if fetched is not None and fetched.version and fetched.contributors:
            # Recorded, so the store is asked once per version; a push made first wins.
            effective = await asyncio.to_thread(self._record_fetched, fetched)
            if version:
                self._by_version[key] = effective
            else:
                self._recheck[key] = (time.monotonic() + RECHECK_AFTER_S, effective)
            return effective
        # Unknown to the store, or no store: a pushed latest version still counts, else nobody.
        prov = stored or fetched or Provenance(adapter_id, version, "", (), ())
        self._recheck[key] = (time.monotonic() + RECHECK_AFTER_S, prov)
        return prov

    def _record_fetched(self, prov: Provenance) -> Provenance:
        try:
            self.register(prov, source="store")
        except ServiceError as exc:
            log.warning("keeping the pushed provenance of %s@%s: %s", prov.adapter_id, prov.version, exc)
        return self._load(prov.adapter_id, prov.version) or prov

    def _load(self, adapter_id: str, version: str) -> Provenance | None:
        """From the table; version '' means the most recently registered version."""
        with self.engine.connect().execution_options(readonly=True) as conn:
            query = select(ProvenanceRow).where(ProvenanceRow.adapter_id == adapter_id)
            if version:
                query = query.where(ProvenanceRow.version == version)
            else:
                query = query.order_by(
                    ProvenanceRow.registered_us.desc(), ProvenanceRow.version.desc()
                ).limit(1)
            row = conn.execute(query).first()
            if row is None:
                return None
            contributors = conn.execute(
                select(ProvenanceContributor)
                .where(
                    ProvenanceContributor.adapter_id == adapter_id,
                    ProvenanceContributor.version == row.version,
                )
                .order_by(ProvenanceContributor.contributor_id)
            ).all()
            return Provenance(
                adapter_id=adapter_id,
                version=row.version,
                trainer=row.trainer,
                datasets=tuple(json.loads(row.datasets)),
                contributors=tuple(
                    Contributor(c.contributor_id, Role(c.role), c.share_micros) for c in contributors
                ),
            )


def _same(a: Provenance, b: Provenance) -> bool:
    def people(p: Provenance) -> list[Contributor]:
        return sorted(p.contributors, key=lambda c: c.contributor_id)

    return a.trainer == b.trainer and a.datasets == b.datasets and people(a) == people(b)
