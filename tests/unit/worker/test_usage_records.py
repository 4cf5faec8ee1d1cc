"""`RequestUsage`: token ranges numbered per kind, the prompt counted once, one range per take, no
range across a minute, shares carried."""

from __future__ import annotations

from unittest import mock

from openlora.v1 import attribution_pb2

from services.inference.usage.records import RequestUsage

MINUTE_NS = 60 * 1_000_000_000


def spans(records: list[attribution_pb2.TokenUsage]) -> list[tuple[int, int, int]]:
    return [(r.kind, r.token_index, r.token_count) for r in records]


def test_a_take_has_the_prompt_once_and_one_range_of_what_was_generated_since_the_last() -> None:
    usage = RequestUsage("r1", "acme", "w1", (("alpha", "v1", 0.25), ("beta", "v3", 0.75)), "tp-1")
    assert not usage.has_untaken and usage.take() == []
    usage.prompt(3)
    usage.prompt(3)  # a later chunk adds nothing
    usage.completion(1)
    usage.completion(2)
    usage.completion(0)
    first = usage.take()
    assert spans(first) == [(attribution_pb2.PROMPT, 0, 3), (attribution_pb2.COMPLETION, 0, 3)]
    assert first[0].traceparent == "tp-1" and first[1].traceparent == ""
    assert usage.take() == []
    usage.completion(4)
    assert spans(usage.take()) == [(attribution_pb2.COMPLETION, 3, 4)]
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 7)
    record = first[-1]
    assert (record.request_id, record.tenant, record.worker_id) == ("r1", "acme", "w1")
    assert [(a.adapter.id, a.adapter.version, a.weight) for a in record.adapters] == [
        ("alpha", "v1", 0.25),
        ("beta", "v3", 0.75),
    ]
    assert record.ts.seconds > 0


def test_a_range_ends_at_a_minute_boundary_and_is_stamped_with_its_first_token() -> None:
    usage = RequestUsage("r", "acme", "w", ())
    start = 1_800_000 * MINUTE_NS + 58 * 1_000_000_000  # two seconds before a minute ends
    clock = iter([start, start + 10**9, start + 3 * 10**9, start + 4 * 10**9])
    with mock.patch("time.time_ns", lambda: next(clock)):
        for count in (1, 2, 3, 4):
            usage.completion(count)
    taken = usage.take()
    assert spans(taken) == [(attribution_pb2.COMPLETION, 0, 3), (attribution_pb2.COMPLETION, 3, 7)]
    assert taken[0].ts.ToNanoseconds() == start
    assert taken[1].ts.ToNanoseconds() == start + 3 * 10**9


def test_the_base_model_credits_no_adapter() -> None:
    usage = RequestUsage("r", "", "w", ())
    usage.completion(1)
    assert list(usage.take()[0].adapters) == []
