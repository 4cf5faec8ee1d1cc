"""A request cancelled before its first token reached the client is billed the prefill the engine had
done: its usage stays open until the engine answers the abort with the prompt tokens it took in, and
only then does the reporter take the prompt's record and let the request go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openlora.v1 import attribution_pb2

from services.cluster.tiny_models import build_tokenizer
from services.inference.engine_process.client import EngineUnavailable
from services.inference.usage.reporter import UsageReporter
from services.inference.usage.spool import UsageSpool
from tests.kit.front import Front, chunk_of

PROMPT, COMPLETION = attribution_pb2.PROMPT, attribution_pb2.COMPLETION


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    folder: Path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture
def reporter(tmp_path: Path) -> UsageReporter:
    """Never started: the test takes what it tracks, as a flush would."""
    return UsageReporter(UsageSpool(tmp_path / "spool"), "unused:0", "kit")


def billed(reporter: UsageReporter) -> list[tuple[int, int, int]]:
    """(kind, first token, count) of every record a flush would take now."""
    reporter._take_tracked()
    records = list(reporter._taken)
    reporter._taken.clear()
    return [(r.kind, r.token_index, r.token_count) for r in records]


def prompt_metric(front: Front) -> float:
    return front.servicer.service.metrics.prompt_tokens._value.get()  # type: ignore[no-any-return]


async def cancel(front: Front, stream_id: int) -> None:
    """The gateway cancels one relayed stream (its client hung up)."""
    front.link.streams[stream_id].cancel()
    await front.drained()


async def test_a_stream_cancelled_during_its_prefill_bills_what_the_engine_computed(
    tokenizer: Any, reporter: UsageReporter
) -> None:
    front = Front(tokenizer, reporter=reporter)
    rid = await front.start(0, list(range(5, 45)), max_new_tokens=20)  # 40 prompt tokens
    await cancel(front, 0)
    assert front.sent.aborted == [rid]
    assert billed(reporter) == [] and len(reporter._tracked) == 1, "kept open for the engine's answer"

    front.answer_aborts({rid: 24})  # three prefill chunks of 8 were computed
    assert billed(reporter) == [(PROMPT, 0, 24)]
    assert reporter._tracked == {}, "then let go"
    assert prompt_metric(front) == 24


async def test_a_stream_cancelled_before_the_engine_took_it_bills_nothing(
    tokenizer: Any, reporter: UsageReporter
) -> None:
    front = Front(tokenizer, reporter=reporter)
    rid = await front.start(0, list(range(5, 45)), max_new_tokens=20)
    await cancel(front, 0)
    front.answer_aborts({rid: 0})
    assert billed(reporter) == [] and reporter._tracked == {}
    assert prompt_metric(front) == 0


async def test_a_prompt_billed_with_its_first_token_is_not_billed_again(
    tokenizer: Any, reporter: UsageReporter
) -> None:
    front = Front(tokenizer, reporter=reporter)
    prompt = list(range(5, 15))
    rid = await front.start(0, prompt, max_new_tokens=20)
    front.step({rid: [7, 8]})
    assert list(chunk_of(front.write()[0]).token_ids) == [7, 8]
    await cancel(front, 0)
    front.answer_aborts({rid: len(prompt)})
    assert billed(reporter) == [(PROMPT, 0, len(prompt)), (COMPLETION, 0, 2)]
    assert reporter._tracked == {} and prompt_metric(front) == len(prompt)


async def test_tokens_the_engine_made_after_the_cancel_mean_the_whole_prompt_was_computed(
    tokenizer: Any, reporter: UsageReporter
) -> None:
    """The request ended in the engine as the abort travelled, so the engine no longer knows it and
    answers 0; the front saw its tokens arrive after the cancel and bills the whole prompt."""
    front = Front(tokenizer, reporter=reporter)
    prompt = list(range(5, 17))
    rid = await front.start(0, prompt, max_new_tokens=1)
    await cancel(front, 0)
    front.step({rid: [9]}, finished=frozenset({rid}))
    front.answer_aborts({rid: 0})
    assert billed(reporter) == [(PROMPT, 0, len(prompt))]  # the token never reached the client
    assert reporter._tracked == {}


async def test_an_engine_lost_before_its_answer_closes_the_usage(
    tokenizer: Any, reporter: UsageReporter
) -> None:
    front = Front(tokenizer, reporter=reporter)
    await front.start(0, list(range(5, 45)), max_new_tokens=20)
    await cancel(front, 0)
    front.engine._fail_streams(EngineUnavailable("the engine process exited"))
    assert billed(reporter) == [] and reporter._tracked == {}
    assert front.engine._aborting == {}


async def test_every_sample_of_a_request_is_waited_for_and_the_prompt_billed_once(
    tokenizer: Any, reporter: UsageReporter
) -> None:
    front = Front(tokenizer, reporter=reporter)
    await front.start(0, list(range(5, 45)), max_new_tokens=20, n=3)
    ids = sorted(front.engine._streams)
    assert len(ids) == 3
    await cancel(front, 0)
    assert sorted(front.sent.aborted) == ids
    front.answer_aborts({ids[0]: 16})
    front.answer_aborts({ids[1]: 0})
    assert billed(reporter) == [(PROMPT, 0, 16)] and len(reporter._tracked) == 1
    front.answer_aborts({ids[2]: 40})
    assert billed(reporter) == [] and reporter._tracked == {}
