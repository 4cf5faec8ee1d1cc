"""Streams spooled usage batches to attribution over a long-lived `StreamUsage` call.

`record()` never blocks generation: it appends to an in-memory buffer that a flusher turns into
durable spool batches every few milliseconds. The sender keeps one stream open, sends every unacked
batch (all of them again after a reconnect: attribution is idempotent on each record's key) and drops
batches from the spool as acks arrive. Attribution being down only grows the spool; a full spool is
an alarm (log + `stats`), and its records wait in memory for room.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import grpc

from services.common.grpc_client import open_channel
from services.common.proto import attribution_pb2, attribution_pb2_grpc
from services.inference.usage.spool import SpoolFull, UsageSpool

log = logging.getLogger("openlora.usage")


@dataclass
class ReporterStats:
    records_buffered: int = 0
    batches_spooled: int = 0
    acked_sequence: int = 0
    reconnects: int = 0
    spool_full_alarms: int = 0
    connected: bool = False


class UsageReporter:
    def __init__(
        self,
        spool: UsageSpool,
        target: str,
        worker_id: str,
        *,
        max_batch_records: int = 4096,
        flush_interval_s: float = 0.05,
        backoff_s: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        self.spool = spool
        self.target = target
        self.worker_id = worker_id
        self.max_batch_records = max_batch_records
        self.flush_interval_s = flush_interval_s
        self.backoff_s = backoff_s
        self.stats = ReporterStats()
        self._buffer: collections.deque[attribution_pb2.TokenUsage] = collections.deque()
        self._spooled = asyncio.Event()
        self._acked = asyncio.Event()
        self._stopping = False
        self._spool_full = False
        self._tasks: list[asyncio.Task[None]] = []

    def record(self, records: Iterable[attribution_pb2.TokenUsage]) -> None:
        """Queue token records (thread-safe, never blocks: deque appends are atomic)."""
        self._buffer.extend(records)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._send_loop())]

    async def close(self, drain_timeout_s: float = 5.0) -> None:
        """Spool what is buffered, give the sender a moment to get it acked, then stop."""
        self._stopping = True
        await self._flush()
        deadline = time.monotonic() + drain_timeout_s
        while self.spool.backlog_batches and self.stats.connected:
            self._acked.clear()
            try:
                await asyncio.wait_for(self._acked.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break  # what is left stays in the spool and is replayed at the next start
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # --- buffer -> spool

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            await self._flush()

    async def _flush(self) -> None:
        while self._buffer:
            count = min(len(self._buffer), self.max_batch_records)
            records = [self._buffer.popleft() for _ in range(count)]
            try:
                await asyncio.to_thread(self.spool.append, self.worker_id, records)
            except SpoolFull as exc:
                self._buffer.extendleft(reversed(records))  # keep them, oldest first, for the next try
                self.stats.spool_full_alarms += 1
                # Once per episode: retried every flush interval, it would flood the log.
                if not self._spool_full:
                    log.error("usage spool full; %d records wait in memory: %s", len(self._buffer), exc)
                self._spool_full = True
                break
            if self._spool_full:
                log.warning("usage spool has room again; %d records wait in memory", len(self._buffer))
                self._spool_full = False
            self.stats.batches_spooled += 1
            self._spooled.set()
        self.stats.records_buffered = len(self._buffer)

    # --- spool -> attribution

    async def _send_loop(self) -> None:
        delay = self.backoff_s[0]
        while True:
            try:
                await self._stream_once()
            except (grpc.aio.AioRpcError, ConnectionError) as exc:
                code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
                log.warning("usage stream to %s broke (%s); retrying in %.1fs", self.target, code, delay)
            self.stats.connected = False
            self.stats.reconnects += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_s[1])

    async def _stream_once(self) -> None:
        async with open_channel(self.target) as channel:
            call = attribution_pb2_grpc.AttributionStub(channel).StreamUsage()
            writer = asyncio.create_task(self._write_pending(call))
            try:
                while (ack := await call.read()) is not grpc.aio.EOF:
                    assert isinstance(ack, attribution_pb2.RecordAck)
                    self.stats.connected = True
                    self.stats.acked_sequence = max(self.stats.acked_sequence, ack.acked_sequence)
                    await asyncio.to_thread(self.spool.ack, ack.acked_sequence)
                    self._acked.set()
            finally:
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await writer
            raise ConnectionError("attribution ended the usage stream")

    async def _write_pending(self, call: grpc.aio.StreamStreamCall) -> None:  # type: ignore[type-arg]
        sent = 0
        while True:
            self._spooled.clear()
            for batch in self.spool.pending():
                if batch.sequence > sent:
                    await call.write(batch)
                    sent = batch.sequence
            await self._spooled.wait()
