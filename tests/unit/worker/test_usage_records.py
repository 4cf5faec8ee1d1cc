"""`RequestUsage`: token ranges numbered per kind, the prompt counted once, shares carried."""

from __future__ import annotations

from services.common.proto import attribution_pb2
from services.inference.usage.records import RequestUsage


def test_records_are_numbered_per_kind_and_carry_the_request() -> None:
    usage = RequestUsage("r1", "acme", "w1", (("alpha", "v1", 0.25), ("beta", "v3", 0.75)))
    prompt = usage.prompt(3)
    assert usage.prompt(3) == []  # a second call (a later chunk) adds nothing
    completion = usage.completion(1) + usage.completion(2)
    assert usage.completion(0) == []
    assert [(r.kind, r.token_index, r.token_count) for r in prompt + completion] == [
        (attribution_pb2.PROMPT, 0, 3),
        (attribution_pb2.COMPLETION, 0, 1),
        (attribution_pb2.COMPLETION, 1, 2),
    ]
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 3)
    record = completion[-1]
    assert (record.request_id, record.tenant, record.worker_id) == ("r1", "acme", "w1")
    assert [(a.adapter.id, a.adapter.version, a.weight) for a in record.adapters] == [
        ("alpha", "v1", 0.25),
        ("beta", "v3", 0.75),
    ]
    assert record.ts.seconds > 0


def test_the_base_model_credits_no_adapter() -> None:
    assert list(RequestUsage("r", "", "w", ()).completion(1)[0].adapters) == []
