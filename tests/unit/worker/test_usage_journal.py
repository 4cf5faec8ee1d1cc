"""The usage journal: what requests counted between spool flushes survives the worker's death.

Each test plays attribution's part with `ledger`: records keyed by (request, first token, kind), the
first copy of a key kept (the spool's batches are sent before the batch recovered from the journal).
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from openlora.v1 import attribution_pb2

from services.inference.usage.journal import UsageJournal, journal_files, recover
from services.inference.usage.records import RequestUsage

PROMPT, COMPLETION = attribution_pb2.PROMPT, attribution_pb2.COMPLETION


def ledger(*sources: list[attribution_pb2.TokenUsage]) -> dict[str, tuple[int, int]]:
    """(prompt, completion) tokens per request once every source is inserted, first copy of a key wins."""
    kept: dict[tuple[str, int, int], int] = {}
    for records in sources:
        for r in records:
            kept.setdefault((r.request_id, r.token_index, r.kind), r.token_count)
    totals: dict[str, list[int]] = {}
    for (request_id, _, kind), count in kept.items():
        totals.setdefault(request_id, [0, 0])[0 if kind == PROMPT else 1] += count
    return {r: (p, c) for r, (p, c) in totals.items()}


def counted(usages: list[RequestUsage]) -> dict[str, tuple[int, int]]:
    return {u.request_id: (u.prompt_tokens, u.completion_tokens) for u in usages if u.completion_tokens}


def tracked(journal: UsageJournal, name: str) -> RequestUsage:
    usage = RequestUsage(
        name, "acme", "w1", (("alpha", "v1", 1.0),), "tp", client_request_id=f"client-{name}"
    )
    usage.journal = journal
    journal.begin(usage)
    return usage


async def test_what_was_counted_since_the_last_flush_is_recovered_after_a_crash(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    usages = [tracked(journal, f"r{i}") for i in range(5)]
    spool: list[attribution_pb2.TokenUsage] = []
    rng = random.Random(7)
    for turn in range(200):
        for usage in rng.sample(usages, 3):
            usage.prompt(11)
            usage.completion(rng.randint(1, 3))
        await asyncio.sleep(0)  # the turn ends: the journal writes
        if turn % 50 == 49:  # a flush: taken, appended to the spool, confirmed
            taken = [r for u in usages for r in u.take()]
            spool.extend(taken)
            journal.spooled(taken)
    for usage in usages[:2]:
        usage.completion(5)
    await asyncio.sleep(0)
    # The worker dies here: no flush, no close. Everything after the last flush is in the journal only.
    recovered = recover(tmp_path)
    assert ledger(spool, recovered) == counted(usages)
    # Recovered records carry the request's labels, and the prompt's its trace context.
    for record in recovered:
        assert (record.tenant, record.worker_id, record.client_request_id) == (
            "acme",
            "w1",
            f"client-{record.request_id}",
        )
        assert [a.adapter.id for a in record.adapters] == ["alpha"] and record.ts.seconds > 0
        assert record.traceparent == ("tp" if record.kind == PROMPT else "")


async def test_a_crash_between_the_spool_append_and_its_confirmation_bills_nothing_twice(
    tmp_path: Path,
) -> None:
    journal = UsageJournal(tmp_path)
    usage = tracked(journal, "r")
    usage.prompt(4)
    usage.completion(3)
    await asyncio.sleep(0)
    taken = usage.take()  # handed to the spool's thread...
    usage.completion(2)  # ...while generation goes on
    await asyncio.sleep(0)
    spool = list(taken)  # the append reached the disk; the worker died before `spooled`
    assert ledger(spool, recover(tmp_path)) == {"r": (4, 5)}
    assert ledger([], recover(tmp_path)) == {"r": (4, 5)}  # the append did not reach the disk


async def test_a_count_is_written_before_a_task_woken_in_the_same_turn_runs(tmp_path: Path) -> None:
    """The transport's writer is such a task: a chunk cannot leave before its count is journaled."""
    journal = UsageJournal(tmp_path)
    usage = tracked(journal, "r")
    await asyncio.sleep(0)
    queue: asyncio.Queue[int] = asyncio.Queue()
    seen: list[dict[str, tuple[int, int]]] = []

    async def writer() -> None:
        for _ in range(3):
            await queue.get()
            seen.append(ledger(recover(tmp_path)))

    task = asyncio.create_task(writer())
    await asyncio.sleep(0)
    for tokens in (1, 2, 3):
        usage.prompt(2)
        usage.completion(1)
        queue.put_nowait(tokens)  # the chunk goes to the transport in the same turn it was counted
        await asyncio.sleep(0.01)
    await task
    assert seen == [{"r": (2, 1)}, {"r": (2, 2)}, {"r": (2, 3)}]


async def test_finished_requests_leave_the_journal_and_it_is_begun_anew_when_large(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path, rotate_bytes=4096)
    live = tracked(journal, "live")
    live.prompt(2)
    spool: list[attribution_pb2.TokenUsage] = []
    for i in range(300):
        done = tracked(journal, f"done-{i}")
        done.prompt(3)
        done.completion(4)
        live.completion(1)
        await asyncio.sleep(0)
        done.close()
        taken = done.take() + live.take()
        spool.extend(taken)
        journal.spooled(taken)
        await asyncio.sleep(0)
    live.completion(6)
    await asyncio.sleep(0)
    assert len(journal_files(tmp_path)) == 1  # rotated many times, each old file removed
    assert journal_files(tmp_path)[0].stat().st_size < 4096 * 2
    recovered = recover(tmp_path)
    assert {r.request_id for r in recovered} == {"live"}  # the finished ones ended
    assert ledger(spool, recovered)["live"] == (2, 306)


async def test_a_torn_tail_is_read_up_to_the_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    journal = UsageJournal(tmp_path)
    usage = tracked(journal, "r")
    usage.prompt(3)
    usage.completion(2)
    await asyncio.sleep(0)
    usage.completion(5)
    await asyncio.sleep(0)
    (path,) = journal_files(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the last write only partly on disk
    assert ledger(recover(tmp_path)) == {"r": (3, 2)}
    assert "damaged" in caplog.text


async def test_close_removes_the_journal_once_everything_is_spooled(tmp_path: Path) -> None:
    journal = UsageJournal(tmp_path)
    usage = tracked(journal, "r")
    usage.completion(2)
    await asyncio.sleep(0)
    journal.close(everything_spooled=False)
    assert len(journal_files(tmp_path)) == 1
    second = UsageJournal(tmp_path)
    second.close(everything_spooled=True)
    assert journal_files(tmp_path) == []
