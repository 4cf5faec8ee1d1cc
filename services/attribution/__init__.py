"""Attribution: the per-token usage ledger, provenance and rewards.

Modules, in the order a usage batch meets them:
- `servicer`   — `openlora.v1.Attribution` over gRPC; translation only.
- `validation` — protobuf → domain; INVALID_ARGUMENT naming the field; a batch is checked whole.
- `service`    — the service as a plain class; moves blocking database work off the event loop.
- `provenance` — who is credited for an adapter version: pushed, else asked once of the adapter store.
- `ledger`     — one transaction per batch: idempotent insert (`events_pg`: COPY on PostgreSQL),
                 sender sequence, per-minute rollups, rewards (`rewards`: exact integer arithmetic).
- `feed`       — committed rewards fanned out to `WatchRewards` subscribers.
- `queries`    — GetUsage from the rollups, GetRewards from the ledger entries.
- `models`, `migrations/`, `db` — the schema (SQLAlchemy 2 + Alembic), PostgreSQL or SQLite.
- `server`, `cli`, `config`    — assembly, `openlora attribution …`, settings.

Guarantees: a record is counted at most once per (request_id, token_index, kind), whatever is
resent; an ack covers only committed batches; money is exact (integer picos, never floats).
"""
