"""Builders of attribution protobuf messages shared by the attribution tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import timestamp_pb2
from openlora.v1 import adapter_store_pb2, attribution_pb2, common_pb2

from services.attribution.settings import AttributionSettings

# 2026-01-01T00:00:00Z: a fixed minute start, so tests know which minute each token falls in.
T0 = 1_767_225_600


def ts(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(int(seconds * 1_000_000))
    return stamp


def token(
    request_id: str,
    index: int,
    *,
    kind: int = attribution_pb2.COMPLETION,
    adapters: Sequence[tuple[str, str, float]] = (("alpha", "v1", 1.0),),
    tenant: str = "acme",
    at: float = T0,
) -> attribution_pb2.TokenUsage:
    return attribution_pb2.TokenUsage(
        request_id=request_id,
        token_index=index,
        kind=kind,  # type: ignore[arg-type]
        adapters=[
            attribution_pb2.WeightedAdapter(adapter=common_pb2.AdapterRef(id=i, version=v), weight=w)
            for i, v, w in adapters
        ],
        tenant=tenant,
        ts=ts(at),
    )


def batch(
    sequence: int, records: Sequence[attribution_pb2.TokenUsage], worker: str = "worker-0"
) -> attribution_pb2.UsageBatch:
    return attribution_pb2.UsageBatch(sequence=sequence, worker_id=worker, records=list(records))


def request_tokens(
    request_id: str,
    prompt: int,
    completion: int,
    adapters: Sequence[tuple[str, str, float]] = (("alpha", "v1", 1.0),),
    tenant: str = "acme",
    at: float = T0,
) -> list[attribution_pb2.TokenUsage]:
    """Every token record of one request: `prompt` prompt tokens then `completion` generated ones."""
    return [
        token(request_id, i, kind=attribution_pb2.PROMPT, adapters=adapters, tenant=tenant, at=at)
        for i in range(prompt)
    ] + [token(request_id, i, adapters=adapters, tenant=tenant, at=at) for i in range(completion)]


def provenance(*contributors: tuple[str, int, float], trainer: str = "") -> adapter_store_pb2.Provenance:
    """`contributors` as (id, role, share); role is adapter_store_pb2.TRAINER or DATA."""
    return adapter_store_pb2.Provenance(
        trainer=trainer,
        datasets=["ds://corpus"],
        contributors=[adapter_store_pb2.Contributor(id=i, role=r, share=s) for i, r, s in contributors],  # type: ignore[arg-type]
    )


def register(
    adapter_id: str, version: str, prov: adapter_store_pb2.Provenance
) -> attribution_pb2.RegisterProvenanceRequest:
    return attribution_pb2.RegisterProvenanceRequest(
        adapter=common_pb2.AdapterRef(id=adapter_id, version=version), provenance=prov
    )


async def read_ack(call: Any) -> attribution_pb2.RecordAck:
    """The next ack of a StreamUsage call (the test fails if the stream ended instead)."""
    ack = await call.read()
    assert isinstance(ack, attribution_pb2.RecordAck), ack
    return ack


def attribution_settings(ledger_url: str, **overrides: object) -> AttributionSettings:
    """Settings of a test server on a free port over `ledger_url` (environment variables still apply)."""
    return AttributionSettings(**{"port": 0, "database_url": ledger_url, **overrides})  # type: ignore[arg-type]
