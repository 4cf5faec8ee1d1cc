"""Usage reporting against a real attribution server: exactly once across outages and restarts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.attribution.app import AttributionApp, build
from services.common.trust.roles import WORKER
from services.inference.usage.records import RequestUsage, new_usage_id
from services.inference.usage.reporter import UsageReporter
from services.inference.usage.spool import UsageSpool
from tests.integration.attribution.wire import attribution_settings, request_tokens
from tests.kit.ports import free_port
from tests.kit.service_auth import identity
from tests.kit.waits import wait_until

WORKER_IDENTITY = identity(WORKER)  # what a worker presents to attribution


async def start_attribution(url: str, port: int) -> AttributionApp:
    server = build(attribution_settings(url, port=port))
    await server.start()
    return server


def ledger_count(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tokens = conn.execute(sa.text("SELECT coalesce(sum(token_count), 0) FROM usage_events"))
            return int(tokens.scalar_one())
    finally:
        engine.dispose()


def tear_last_write(spool_dir: Path) -> None:
    """Append half a record, as a crash in the middle of a write would leave it."""
    with open(next(spool_dir.glob("seg-*.v2")), "ab") as torn:
        torn.write(b"\x10\x00\x00\x00garbage")


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'ledger.sqlite3'}"


@pytest.fixture
async def running_attribution(ledger_url: str) -> AsyncIterator[tuple[AttributionApp, int]]:
    port = free_port()
    server = await start_attribution(ledger_url, port)
    yield server, port
    await server.close()


async def test_records_reach_the_ledger_once_and_leave_the_spool(
    running_attribution: tuple[AttributionApp, int], ledger_url: str, tmp_path: Path
) -> None:
    _, port = running_attribution
    spool = UsageSpool(tmp_path / "spool", segment_batches=4)
    reporter = UsageReporter(
        spool, f"127.0.0.1:{port}", "worker-a", identity=WORKER_IDENTITY, max_batch_records=50
    )
    await reporter.start()
    for i in range(20):
        reporter.record(request_tokens(f"req-{i}", prompt=30, completion=20))
    await wait_until(lambda: ledger_count(ledger_url) == 1000 and spool.backlog_batches == 0)
    await reporter.close()
    assert ledger_count(ledger_url) == 1000
    assert not list((tmp_path / "spool").glob("seg-*"))  # every segment acked and deleted


def ledger_ranges(url: str) -> list[tuple[str, int, int]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT request_id, token_index, token_count FROM usage_events WHERE kind = 2")
            )
            return sorted((str(r[0]), int(r[1]), int(r[2])) for r in rows)
    finally:
        engine.dispose()


async def test_a_tracked_request_is_billed_one_range_per_flush_then_forgotten(
    running_attribution: tuple[AttributionApp, int], ledger_url: str, tmp_path: Path
) -> None:
    _, port = running_attribution
    reporter = UsageReporter(
        UsageSpool(tmp_path / "spool"),
        f"127.0.0.1:{port}",
        "w",
        identity=WORKER_IDENTITY,
        flush_interval_s=3600,
    )
    await reporter.start()
    usage = RequestUsage(new_usage_id(), "acme", "w", (("alpha", "v1", 1.0),))
    reporter.track(usage)
    usage.prompt(5)
    for _ in range(3):
        usage.completion(2)  # three chunks: one flush
    await reporter._flush()
    usage.completion(1)
    usage.close()
    await reporter._flush()
    await wait_until(lambda: ledger_count(ledger_url) == 12)
    assert ledger_ranges(ledger_url) == [(usage.request_id, 0, 6), (usage.request_id, 6, 1)]
    assert not reporter._tracked
    await reporter.close()
    assert ledger_count(ledger_url) == 12


@pytest.mark.slow
async def test_attribution_down_then_back_loses_and_doubles_nothing(ledger_url: str, tmp_path: Path) -> None:
    port = free_port()
    spool = UsageSpool(tmp_path / "spool")
    reporter = UsageReporter(
        spool, f"127.0.0.1:{port}", "worker-b", identity=WORKER_IDENTITY, backoff_s=(0.05, 0.5)
    )
    await reporter.start()
    for i in range(10):  # attribution is not running: everything goes to the spool
        reporter.record(request_tokens(f"down-{i}", prompt=10, completion=10))
    await wait_until(lambda: spool.backlog_batches > 0)
    server = await start_attribution(ledger_url, port)
    try:
        for i in range(10):
            reporter.record(request_tokens(f"up-{i}", prompt=5, completion=5))
        await wait_until(lambda: ledger_count(ledger_url) == 300 and spool.backlog_batches == 0)
        await reporter.close()
    finally:
        await server.close()
    assert ledger_count(ledger_url) == 300


async def test_a_restarted_worker_replays_its_spool(ledger_url: str, tmp_path: Path) -> None:
    port = free_port()
    first = UsageReporter(
        UsageSpool(tmp_path / "spool"), f"127.0.0.1:{port}", "worker-c", identity=WORKER_IDENTITY
    )
    await first.start()
    first.record(request_tokens("before-crash", prompt=40, completion=60))
    await first.close(drain_timeout_s=0.2)  # attribution is down: the batch stays spooled
    await asyncio.to_thread(tear_last_write, tmp_path / "spool")
    server = await start_attribution(ledger_url, port)
    try:
        spool = UsageSpool(tmp_path / "spool")
        assert spool.backlog_batches == 1
        second = UsageReporter(spool, f"127.0.0.1:{port}", "worker-c", identity=WORKER_IDENTITY)
        await second.start()
        second.record(request_tokens("after-restart", prompt=1, completion=1))
        await wait_until(lambda: ledger_count(ledger_url) == 102 and spool.backlog_batches == 0)
        await second.close()
    finally:
        await server.close()
    assert UsageSpool(tmp_path / "spool").backlog_batches == 0


async def test_a_full_spool_is_an_alarm_not_a_crash(tmp_path: Path) -> None:
    spool = UsageSpool(tmp_path / "spool", max_bytes=600)  # a few batches of two ranges each
    reporter = UsageReporter(
        spool,
        "127.0.0.1:9",
        "worker-d",
        identity=WORKER_IDENTITY,
        max_batch_records=20,
        flush_interval_s=0.01,
    )
    await reporter.start()
    for i in range(10):
        reporter.record(request_tokens(f"r{i}", prompt=10, completion=10))
    await wait_until(lambda: reporter.stats.spool_full_alarms > 0)
    assert reporter.stats.records_buffered > 0  # kept in memory, waiting for room
    assert spool.backlog_bytes <= 600
    await reporter.close(drain_timeout_s=0.1)
