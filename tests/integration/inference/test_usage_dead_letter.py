"""Records attribution refuses are set aside, never resent, and never hold back the rest: a real
reporter and spool against a real attribution server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from services.attribution.app import build
from services.common.trust.roles import WORKER
from services.inference.usage.records import RequestUsage, new_usage_id
from services.inference.usage.reporter import UsageReporter
from services.inference.usage.spool import UsageSpool
from tests.integration.attribution.wire import attribution_settings, request_tokens
from tests.integration.inference.test_usage_reporter import ledger_count
from tests.kit.ports import free_port
from tests.kit.service_auth import identity
from tests.kit.waits import wait_until

WORKER_IDENTITY = identity(WORKER)  # what a worker presents to attribution


@contextlib.asynccontextmanager
async def attribution_at(tmp_path: Path, **settings: object) -> AsyncIterator[tuple[str, str]]:
    """A real attribution server on SQLite: (ledger url, address)."""
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    port = free_port()
    attribution = build(attribution_settings(url, port=port, **settings))
    await attribution.start()
    try:
        yield url, f"127.0.0.1:{port}"
    finally:
        await attribution.close()


def served_requests(url: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(
                conn.execute(sa.text("SELECT count(DISTINCT request_id) FROM usage_events")).scalar_one()
            )
    finally:
        engine.dispose()


async def test_a_poisoned_record_is_dead_lettered_and_the_next_1000_requests_are_billed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with attribution_at(tmp_path) as (url, address):
        spool = UsageSpool(tmp_path / "spool")
        reporter = UsageReporter(spool, address, "worker-p", identity=WORKER_IDENTITY, flush_interval_s=0.01)
        await reporter.start()
        # Past every check a request passes: as if a worker had a bug, or an old worker's spool.
        reporter.record(request_tokens("job 42", prompt=1, completion=0))
        for _ in range(1000):
            usage = RequestUsage(new_usage_id(), "acme", "worker-p", (("alpha", "v1", 1.0),))
            usage.prompt(3)
            usage.completion(2)
            usage.close()
            reporter.track(usage)
        try:
            await wait_until(lambda: ledger_count(url) == 5000 and spool.backlog_batches == 0, timeout=60)
        finally:
            await reporter.close()
    assert served_requests(url) == 1000
    (letter,) = reporter.dead_letters.read()
    assert str(letter["field"]).endswith(".request_id") and letter["index"] == 0
    assert letter["record"]["requestId"] == "job 42"  # type: ignore[index]
    assert reporter.dead_letters.records == 1
    errors = [r.message for r in caplog.records if r.levelno == logging.ERROR]
    assert any("refused by attribution" in message for message in errors)


async def test_a_batch_refused_whole_is_dead_lettered_and_the_acks_move_past_it(tmp_path: Path) -> None:
    async with attribution_at(tmp_path, max_batch_records=100) as (url, address):
        spool = UsageSpool(tmp_path / "spool")
        # A worker set up for larger batches than attribution takes: its first batch is refused whole.
        reporter = UsageReporter(spool, address, "worker-q", identity=WORKER_IDENTITY, max_batch_records=150)
        # 120 one-token requests: still 120 records once the reporter joins each request's ranges.
        for i in range(120):
            reporter.record(request_tokens(f"big-{i}", prompt=0, completion=1))
        await reporter._flush()  # one batch, spooled before the stream opens
        await reporter.start()
        try:
            for i in range(5):
                reporter.record(request_tokens(f"small-{i}", prompt=10, completion=10))
                await asyncio.sleep(0.1)
            await wait_until(lambda: ledger_count(url) == 100 and spool.backlog_batches == 0, timeout=30)
        finally:
            await reporter.close()
    letters = reporter.dead_letters.read()
    assert len(letters) == 120 and {letter["sequence"] for letter in letters} == {1}
    assert all("100 per batch" in str(letter["reason"]) for letter in letters)


async def test_the_sender_survives_an_unexpected_error(tmp_path: Path) -> None:
    async with attribution_at(tmp_path) as (url, address):
        spool = UsageSpool(tmp_path / "spool")
        reporter = UsageReporter(spool, address, "worker-r", identity=WORKER_IDENTITY, backoff_s=(0.05, 0.1))
        real_read = spool.pending_in_memory  # where the sender takes fresh batches from
        failures = iter([True])

        def flaky_read(sequence: int, limit: int) -> list[object] | None:
            if next(failures, False):
                raise RuntimeError("injected")
            return real_read(sequence, limit)  # type: ignore[return-value]

        spool.pending_in_memory = flaky_read  # type: ignore[method-assign, assignment]
        reporter.record(request_tokens("r", prompt=2, completion=2))
        await reporter.start()
        try:
            await wait_until(lambda: ledger_count(url) == 4 and spool.backlog_batches == 0, timeout=30)
        finally:
            await reporter.close()
    assert reporter.stats.send_errors == 1
