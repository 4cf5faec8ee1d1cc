"""`openlora.v1.Attribution` over gRPC: protobuf → domain → `AttributionService` → protobuf."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from decimal import Decimal, InvalidOperation
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from openlora.v1 import attribution_pb2, attribution_pb2_grpc, common_pb2
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.attribution import validation
from services.attribution.domain import (
    MICROS_PER_UNIT,
    US_PER_MINUTE,
    IngestResult,
    RewardEntry,
    format_amount,
    to_picos,
)
from services.attribution.queries import TimeRange, UsageCount
from services.attribution.service import AttributionService
from services.common.errors import InvalidArgument, Unavailable
from services.common.grpc_server import ServiceBinding

log = logging.getLogger("openlora.attribution")
_PROPAGATOR = TraceContextTextMapPropagator()
# A price above this would overflow 64-bit pico sums within a few tokens; certainly a mistake.
MAX_PRICE = Decimal(1000)


async def _until(batches: AsyncIterator[Any], draining: asyncio.Event) -> AsyncIterator[Any]:
    """`batches` until `draining` is set (then UNAVAILABLE: the sender reconnects and resends)."""
    reading = aiter(batches)
    ended = asyncio.ensure_future(draining.wait())
    try:
        while True:
            batch = asyncio.ensure_future(anext(reading, None))
            await asyncio.wait((batch, ended), return_when=asyncio.FIRST_COMPLETED)
            if not batch.done():
                batch.cancel()
                raise Unavailable("attribution is shutting down; resend unacked batches", retry_after_s=0.5)
            item = batch.result()
            if item is None:
                return
            yield item
    finally:
        ended.cancel()


class _StreamAcks:
    """Ack bookkeeping of one RecordUsage/StreamUsage call."""

    def __init__(self) -> None:
        self.highest_sent = 0
        self.acked = 0
        self.inserted = 0
        self.duplicates = 0

    def add(self, sequence: int, result: IngestResult) -> int:
        self.highest_sent = max(self.highest_sent, sequence)
        self.inserted += result.inserted
        self.duplicates += result.duplicates
        # Never ack past what this stream sent: a sender that restarted its numbering (and so sits
        # below the stored cursor) must not be told that batches it has not sent yet are safe.
        self.acked = max(self.acked, min(result.acked_sequence, self.highest_sent))
        return self.acked


class AttributionServicer(attribution_pb2_grpc.AttributionServicer):
    def __init__(self, service: AttributionService, tracer: trace.Tracer | None = None) -> None:
        self.service = service
        self.tracer = tracer or trace.get_tracer("openlora.attribution")
        self._draining = asyncio.Event()
        settings = service.settings
        self._mixes = validation.CheckedMixes()
        self._limits = {
            "max_records": settings.max_batch_records,
            "max_token_index": settings.max_token_index,
            "max_future_us": int(settings.max_clock_skew_s * 1_000_000),
        }

    async def _ingest(
        self, message: attribution_pb2.UsageBatch
    ) -> tuple[IngestResult, list[attribution_pb2.RefusedRecord]]:
        started = time.time_ns()
        batch = validation.usage_batch(message, **self._limits, mixes=self._mixes)
        if batch.clock_ahead:
            log.warning(
                "worker %s stamps usage more than %ss ahead of this clock; %d record(s) of batch %d "
                "stamped with their arrival time instead",
                batch.worker_id,
                self.service.settings.max_clock_skew_s,
                batch.clock_ahead,
                batch.sequence,
            )
        for refusal in batch.refused:
            log.error(
                "refused usage record %d of batch %d from worker %s: %s: %s",
                refusal.index,
                batch.sequence,
                batch.worker_id,
                refusal.field,
                refusal.reason,
            )
        result = await self.service.ingest(batch)
        self._join_request_traces(message, started)
        refused = [
            attribution_pb2.RefusedRecord(
                sequence=batch.sequence, index=r.index, field=r.field, reason=r.reason
            )
            for r in batch.refused
        ]
        return result, refused

    def _join_request_traces(self, message: attribution_pb2.UsageBatch, started_ns: int) -> None:
        """One `ledger.write` span in the trace of each request whose traced record this batch held.

        The usage stream outlives any request, so its own span cannot be a request's child; the record
        that carries the request's traceparent links the ledger write back into that request's trace."""
        for record in message.records:
            if not record.traceparent:
                continue
            parent = _PROPAGATOR.extract({"traceparent": record.traceparent})
            span = self.tracer.start_span(
                "ledger.write",
                context=parent,
                start_time=started_ns,
                attributes={
                    "openlora.request_id": record.request_id,
                    "openlora.worker_id": message.worker_id,
                    "openlora.usage.batch": message.sequence,
                    "openlora.usage.records": len(message.records),
                },
            )
            span.end()

    async def RecordUsage(
        self, request_iterator: AsyncIterator[attribution_pb2.UsageBatch], context: Any
    ) -> attribution_pb2.RecordAck:
        acks = _StreamAcks()
        refused: list[attribution_pb2.RefusedRecord] = []
        async for message in request_iterator:
            result, batch_refused = await self._ingest(message)
            acks.add(message.sequence, result)
            refused += batch_refused
        return attribution_pb2.RecordAck(
            acked_sequence=acks.acked,
            inserted_records=acks.inserted,
            duplicate_records=acks.duplicates,
            refused=refused,
        )

    def end_usage_streams(self) -> None:
        """End every usage stream after the batch it is on (the server is draining): they never end by
        themselves, and each sender resends what was not acked, to whichever replica it reaches."""
        self._draining.set()

    async def StreamUsage(
        self, request_iterator: AsyncIterator[attribution_pb2.UsageBatch], context: Any
    ) -> AsyncIterator[attribution_pb2.RecordAck]:
        acks = _StreamAcks()
        async for message in _until(request_iterator, self._draining):
            result, refused = await self._ingest(message)
            yield attribution_pb2.RecordAck(
                acked_sequence=acks.add(message.sequence, result),
                inserted_records=result.inserted,
                duplicate_records=result.duplicates,
                sequence=message.sequence,
                refused=refused,
            )

    async def GetUsage(
        self, request: attribution_pb2.UsageQuery, context: Any
    ) -> attribution_pb2.UsageReport:
        adapter_id = validation.check_id("adapter_id", request.adapter_id, required=False, max_chars=256)
        tenant = validation.check_id("tenant", request.tenant, required=False)
        client_request_id = validation.check_id("request_id", request.request_id, required=False)
        if client_request_id and adapter_id:
            raise InvalidArgument("adapter_id", "cannot be combined with request_id")
        window = _time_range(request)
        result = await self.service.usage(adapter_id, tenant, window, client_request_id)
        return attribution_pb2.UsageReport(
            totals=_usage_bucket(result.totals), buckets=[_usage_bucket(b) for b in result.buckets]
        )

    async def GetRewards(
        self, request: attribution_pb2.RewardsQuery, context: Any
    ) -> attribution_pb2.RewardsReport:
        contributor_id = validation.check_id(
            "contributor_id", request.contributor_id, required=False, max_chars=256
        )
        adapter_id = validation.check_id("adapter_id", request.adapter_id, required=False, max_chars=256)
        tenant = validation.check_id("tenant", request.tenant, required=False)
        result = await self.service.rewards(contributor_id, adapter_id, tenant, _time_range(request))
        return attribution_pb2.RewardsReport(
            total=format_amount(result.total_picos),
            currency=self.service.settings.currency,
            lines=[
                attribution_pb2.RewardLine(
                    contributor_id=line.contributor_id,
                    adapter_id=line.adapter_id,
                    tokens=line.tokens_micros / MICROS_PER_UNIT,
                    amount=format_amount(line.amount_picos),
                )
                for line in result.lines
            ],
            buckets=[
                attribution_pb2.RewardBucket(start=_timestamp(start), amount=format_amount(picos))
                for start, picos in result.buckets
            ],
        )

    async def WatchRewards(
        self, request: attribution_pb2.WatchRewardsRequest, context: Any
    ) -> AsyncIterator[attribution_pb2.RewardEvent]:
        contributor_id = validation.check_id(
            "contributor_id", request.contributor_id, required=False, max_chars=256
        )
        adapter_id = validation.check_id("adapter_id", request.adapter_id, required=False, max_chars=256)
        with self.service.watch(contributor_id, adapter_id) as subscription:
            # Headers go out now, so a client knows it is subscribed before the first event.
            await context.send_initial_metadata(())
            while True:
                yield _reward_event(await subscription.next())

    async def RegisterProvenance(
        self, request: attribution_pb2.RegisterProvenanceRequest, context: Any
    ) -> attribution_pb2.RegisterProvenanceResponse:
        adapter_id = validation.check_id("adapter.id", request.adapter.id, max_chars=256)
        version = validation.check_id("adapter.version", request.adapter.version)
        prov = validation.provenance("provenance", adapter_id, version, request.provenance)
        created = await self.service.register_provenance(prov)
        return attribution_pb2.RegisterProvenanceResponse(created=created)

    async def SetPrice(
        self, request: attribution_pb2.SetPriceRequest, context: Any
    ) -> attribution_pb2.SetPriceResponse:
        adapter_id = validation.check_id("adapter_id", request.adapter_id, required=False, max_chars=256)
        prompt = _price("prompt_price", request.prompt_price)
        completion = _price("completion_price", request.completion_price)
        await self.service.set_price(adapter_id, prompt, completion)
        return attribution_pb2.SetPriceResponse(currency=self.service.settings.currency)


def binding(servicer: AttributionServicer) -> ServiceBinding:
    return ServiceBinding(
        name="openlora.v1.Attribution",
        attach=lambda server: attribution_pb2_grpc.add_AttributionServicer_to_server(servicer, server),
    )


def _price(field: str, text: str) -> int:
    """An exact decimal price string as picos; refused unless representable exactly."""
    if not text:
        raise InvalidArgument(field, 'must be set, e.g. "0.0000005"')
    try:
        price = Decimal(text)
    except InvalidOperation:
        raise InvalidArgument(field, f"not a decimal number: {text!r}") from None
    if not price.is_finite() or price < 0 or price > MAX_PRICE:
        raise InvalidArgument(field, f"must be between 0 and {MAX_PRICE}")
    picos = to_picos(price)
    if Decimal(picos).scaleb(-12) != price:
        raise InvalidArgument(field, "has more than 12 decimal places")
    return picos


# google.protobuf.Timestamp's own range ends with 9999; past it the microseconds overflow the ledger's
# 64-bit integers (a query for year 146 billion was INTERNAL).
_MAX_TIMESTAMP_S = 253_402_300_799
# google.protobuf.Duration's own range: 10,000 years.
_MAX_DURATION_S = 315_576_000_000


def _micros_of(field: str, ts: timestamp_pb2.Timestamp) -> int:
    if not 0 <= ts.seconds <= _MAX_TIMESTAMP_S or not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidArgument(field, "must be a valid time from 1970 to 9999")
    return ts.seconds * 1_000_000 + ts.nanos // 1000


def _time_range(request: attribution_pb2.UsageQuery | attribution_pb2.RewardsQuery) -> TimeRange:
    start = _micros_of("start", request.start) if request.HasField("start") else None
    end = _micros_of("end", request.end) if request.HasField("end") else None
    if start is not None and end is not None and end <= start:
        raise InvalidArgument("end", "must be after start")
    bucket = None
    if request.HasField("bucket"):
        bucket = _bucket_us(request.bucket)
    return TimeRange(start, end, bucket)


def _bucket_us(duration: duration_pb2.Duration) -> int:
    if duration.seconds > _MAX_DURATION_S:
        raise InvalidArgument("bucket", f"must be at most {_MAX_DURATION_S} seconds (10,000 years)")
    micros = duration.seconds * 1_000_000 + duration.nanos // 1000
    if micros <= 0 or micros % US_PER_MINUTE:
        raise InvalidArgument(
            "bucket", "must be a positive whole number of minutes (usage is kept per minute)"
        )
    return micros


def _timestamp(micros: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromMicroseconds(micros)
    return ts


def _usage_bucket(count: UsageCount) -> attribution_pb2.UsageBucket:
    bucket = attribution_pb2.UsageBucket(
        prompt_tokens=count.prompt_tokens, completion_tokens=count.completion_tokens
    )
    if count.start_us is not None:
        bucket.start.CopyFrom(_timestamp(count.start_us))
    return bucket


def _reward_event(entry: RewardEntry) -> attribution_pb2.RewardEvent:
    return attribution_pb2.RewardEvent(
        contributor_id=entry.contributor_id,
        adapter=common_pb2.AdapterRef(id=entry.adapter_id, version=entry.adapter_version),
        request_id=entry.request_id,
        tokens=entry.tokens_micros / MICROS_PER_UNIT,
        amount=format_amount(entry.amount_picos),
        ts=_timestamp(entry.committed_us),
    )
