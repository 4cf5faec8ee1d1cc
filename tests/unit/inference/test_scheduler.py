"""Admission, chunked prefill, preemption, cancellation and adapter-aware waiting, without torch.

Every test runs through `make_harness`, whose teardown asserts that all KV blocks came back.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from services.inference.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus
from tests.unit.inference.token_store import Harness, reference_output

MakeHarness = Callable[..., Harness]


def chunk_sizes(h: Harness) -> dict[str, int]:
    out = h.step()
    return {c.seq.request_id: c.num_new_tokens for c in out.chunks}


def test_prompts_are_admitted_in_order_within_the_token_budget(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=32, max_num_batched_tokens=16)
    seqs = [h.add(name, [i + 1] * 10, max_new_tokens=2) for i, name in enumerate("abc")]
    # a's prompt fits whole; b gets the rest of the budget as a first chunk; c waits.
    assert chunk_sizes(h) == {"a": 10, "b": 6}
    # a decodes (1 token) next to b's last chunk (4) and c's whole prompt (10).
    assert chunk_sizes(h) == {"a": 1, "b": 4, "c": 10}
    h.run_until_done()
    assert [s.output_token_ids for s in seqs] == [reference_output([i + 1] * 10, 2) for i in range(3)]


def test_decode_and_prefill_chunks_share_a_step(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=64, max_num_batched_tokens=8, max_prefill_chunk=5)
    short = h.add("short", [1, 2, 3], max_new_tokens=6)
    h.step()
    long = h.add("long", list(range(20)), max_new_tokens=2)
    sizes = [chunk_sizes(h) for _ in range(4)]
    # The long prompt is prefilled 5 tokens at a time while the short one decodes every step.
    assert sizes == [{"short": 1, "long": 5}] * 4
    h.run_until_done()
    assert short.output_token_ids == reference_output([1, 2, 3], 6)
    assert long.output_token_ids == reference_output(list(range(20)), 2)


def test_a_partial_prefill_samples_nothing(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=16, max_num_batched_tokens=4)
    s = h.add("a", list(range(10)), max_new_tokens=1)
    out = h.step()
    assert [c.samples for c in out.chunks] == [False] and s.num_output_tokens == 0
    assert s.num_computed_tokens == 4
    h.run_until_done()
    assert s.finish_reason is FinishReason.LENGTH
    assert s.output_token_ids == reference_output(list(range(10)), 1)


def test_max_num_seqs_caps_the_batch(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=64, max_num_seqs=2)
    for i in range(4):
        h.add(f"r{i}", [i + 1, 2, 3], max_new_tokens=3)
    assert set(chunk_sizes(h)) == {"r0", "r1"}
    assert len(h.scheduler.waiting) == 2
    h.run_until_done()


def test_admission_waits_for_free_blocks_in_arrival_order(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=6, block_size=4, max_num_batched_tokens=64)
    big = h.add("big", list(range(16)), max_new_tokens=4)  # 5 blocks at its longest
    h.step()
    blocked = h.add("blocked", list(range(30, 42)), max_new_tokens=1)  # 3 blocks
    small = h.add("small", [5], max_new_tokens=1)  # would fit, but must not overtake
    out = h.step()
    assert [c.seq.request_id for c in out.chunks] == ["big"]
    assert blocked.status is SequenceStatus.WAITING and small.status is SequenceStatus.WAITING
    h.run_until_done()
    assert big.finish_reason is blocked.finish_reason is small.finish_reason is FinishReason.LENGTH


def test_newest_running_sequence_is_preempted_and_recomputed(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=5, block_size=4, max_num_batched_tokens=64)
    old = h.add("old", list(range(7)), max_new_tokens=9)  # 2 blocks now, 4 at its longest
    new = h.add("new", list(range(50, 57)), max_new_tokens=9)
    h.step()
    assert old.status is new.status is SequenceStatus.RUNNING and h.bm.num_free_blocks == 1
    preempted_at = None
    while h.scheduler.has_unfinished():
        out = h.step()
        if out.preempted and preempted_at is None:
            preempted_at = h.steps
            assert out.preempted == [new], "the newest request gives way"
            assert h.scheduler.waiting[0] is new and new.block_table == []
            assert new.num_output_tokens > 0, "generated tokens survive preemption"
    assert preempted_at is not None and new.num_preemptions >= 1
    assert old.output_token_ids == reference_output(list(range(7)), 9)
    assert new.output_token_ids == reference_output(list(range(50, 57)), 9)


def test_the_newest_sequence_preempts_itself_when_it_runs_out(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=4, block_size=2, max_num_batched_tokens=64)
    a = h.add("a", [1, 2, 3], max_new_tokens=2)
    b = h.add("b", [4, 5, 6, 7], max_new_tokens=3)
    h.step()
    assert h.bm.num_free_blocks == 0
    # a's next token fits its second block; b, the newest, needs a third block and gives way itself.
    out = h.step()
    assert out.preempted == [b] and [c.seq for c in out.chunks] == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and b.num_output_tokens == 1
    h.run_until_done()
    assert a.output_token_ids == reference_output([1, 2, 3], 2)
    assert b.output_token_ids == reference_output([4, 5, 6, 7], 3)


def test_no_admission_in_a_step_that_preempted(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=4, block_size=2, max_num_batched_tokens=64)
    h.add("a", [1, 2, 3], max_new_tokens=5)
    h.add("b", [4, 5, 6], max_new_tokens=5)
    h.step()
    h.add("c", [7], max_new_tokens=1)
    preempting_steps = 0
    while h.scheduler.has_unfinished():
        was_running = {s.seq_id for s in h.scheduler.running}
        out = h.step()
        if out.preempted:
            preempting_steps += 1
            # Admitting would only feed the next preemption.
            assert {c.seq.seq_id for c in out.chunks} <= was_running
    assert preempting_steps >= 1


def test_cancelling_frees_blocks_at_once_wherever_the_request_is(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=8, block_size=4, max_num_seqs=1)
    running = h.add("running", list(range(9)), max_new_tokens=8)
    waiting = h.add("waiting", [1, 2], max_new_tokens=2)
    h.step()
    assert h.bm.num_free_blocks == 5
    assert h.scheduler.abort("running") is running
    assert running.finish_reason is FinishReason.CANCELLED and running.block_table == []
    assert h.bm.num_free_blocks == 8
    assert h.scheduler.abort("waiting") is waiting and waiting.finish_reason is FinishReason.CANCELLED
    assert h.scheduler.abort("unknown") is None
    assert not h.scheduler.has_unfinished()


def test_cancel_between_schedule_and_postprocess_drops_the_result(make_harness: MakeHarness) -> None:
    h = make_harness()
    s = h.add("a", [1, 2, 3], max_new_tokens=4)
    out = h.scheduler.schedule()
    sampled = h.store.run(out)
    h.scheduler.abort("a")
    assert h.scheduler.postprocess(out, sampled) == []
    assert s.output_token_ids == [] and s.block_table == []


def test_requests_wait_in_loading_without_stalling_others(make_harness: MakeHarness) -> None:
    resident: set[str] = set()
    h = make_harness(adapter_ready=lambda s: s.adapter_key is None or s.adapter_key in resident)
    cold = h.add("cold", [1, 2, 3], max_new_tokens=3, adapter_key="cold-adapter")
    cold2 = h.add("cold2", [1, 2, 3], max_new_tokens=3, adapter_key="cold-adapter")
    base = h.add("base", [4, 5, 6], max_new_tokens=3)
    for _ in range(2):
        assert set(chunk_sizes(h)) == {"base"}
        assert cold.status is SequenceStatus.LOADING and cold2.status is SequenceStatus.LOADING
    assert [s.request_id for s in h.scheduler.waiting] == ["cold", "cold2"], "arrival order is kept"
    resident.add("cold-adapter")
    assert set(chunk_sizes(h)) == {"base", "cold", "cold2"}
    h.run_until_done()
    assert base.finish_reason is cold.finish_reason is FinishReason.LENGTH
    assert cold.output_token_ids == reference_output([1, 2, 3], 3)


@pytest.mark.parametrize(
    ("params", "reason", "length"),
    [
        (SamplingParams(max_new_tokens=3), FinishReason.STOP, 2),
        (SamplingParams(max_new_tokens=3, ignore_eos=True), FinishReason.LENGTH, 3),
        (SamplingParams(max_new_tokens=5, stop_token_ids=(42,), ignore_eos=True), FinishReason.STOP, 1),
    ],
)
def test_stop_conditions(
    make_harness: MakeHarness, params: SamplingParams, reason: FinishReason, length: int
) -> None:
    h = make_harness()
    s = Sequence("a", [1, 2], params)
    h.scheduler.add(s)
    # Drive postprocess with chosen tokens: 42, then EOS (0), then 7s.
    tokens = iter([42, 0, 7, 7, 7])
    while h.scheduler.has_unfinished():
        out = h.scheduler.schedule()
        h.scheduler.postprocess(out, [next(tokens) for c in out.chunks if c.samples])
    assert s.finish_reason is reason and s.num_output_tokens == length


def test_prompt_longer_than_the_cache_is_refused(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        h.add("a", list(range(6)), max_new_tokens=3)
    h.add("fits", list(range(6)), max_new_tokens=2)
    h.run_until_done()


def test_shared_system_prompt_is_served_from_the_prefix_cache(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=32, block_size=4)
    system = list(range(100, 112))  # three blocks
    first = h.add("first", [*system, 1], max_new_tokens=2)
    h.run_until_done()
    second = h.add("second", [*system, 2, 3], max_new_tokens=2)
    out = h.step()
    assert second.num_cached_tokens == 12 and out.chunks[0].num_new_tokens == 2
    h.run_until_done()
    assert first.output_token_ids == reference_output([*system, 1], 2)
    assert second.output_token_ids == reference_output([*system, 2, 3], 2)


def test_preempted_sequence_resumes_from_its_own_cached_blocks(make_harness: MakeHarness) -> None:
    h = make_harness(num_blocks=6, block_size=2, max_num_batched_tokens=64)
    old = h.add("old", list(range(6)), max_new_tokens=5)
    new = h.add("new", list(range(20, 25)), max_new_tokens=5)
    h.run_until_done()
    assert new.num_preemptions >= 1 or old.num_preemptions >= 1
    assert h.bm.prefix_hits > 0, "recompute after preemption hit the blocks it had just freed"
    assert old.output_token_ids == reference_output(list(range(6)), 5)
    assert new.output_token_ids == reference_output(list(range(20, 25)), 5)


@pytest.mark.parametrize("seed", range(24))
def test_random_workload_matches_each_request_run_alone(make_harness: MakeHarness, seed: int) -> None:
    """Staggered arrivals, cancellations, shared prefixes, an adapter that comes and goes and a small
    cache: outputs never change."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    resident = {"x"}
    h = make_harness(
        adapter_ready=lambda s: s.adapter_key is None or s.adapter_key in resident,
        num_blocks=rng.randint(-(-60 // block_size), 100 // block_size),  # the longest request needs 57
        block_size=block_size,
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(4, 48),
        max_prefill_chunk=rng.choice([None, 3, 7]),
        prefix_caching=rng.random() < 0.8,
    )
    shared = [rng.randrange(1, 97) for _ in range(rng.randint(0, 20))]
    pending = []
    for i in range(25):
        own = [rng.randrange(1, 97) for _ in range(rng.randint(1, 25))]
        prompt = (shared if rng.random() < 0.5 else []) + own
        pending.append((rng.randint(0, 40), f"r{i}", prompt, rng.randint(1, 12)))
    pending.sort()
    seqs: dict[str, Sequence] = {}
    cancelled: set[str] = set()
    while pending or h.scheduler.has_unfinished():
        while pending and pending[0][0] <= h.steps:
            _, rid, prompt, n = pending.pop(0)
            seqs[rid] = h.add(rid, prompt, max_new_tokens=n, adapter_key=rng.choice([None, None, "x"]))
        live = [s for s in seqs.values() if not s.is_finished]
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            assert h.scheduler.abort(victim.request_id) is victim
            cancelled.add(victim.request_id)
        if rng.random() < 0.2:
            resident ^= {"x"}
        h.step()
        assert h.steps < 2000
    for rid, s in seqs.items():
        if rid in cancelled:
            assert s.finish_reason is FinishReason.CANCELLED
            continue
        expected = reference_output(s.prompt_token_ids, s.sampling.max_new_tokens)
        assert s.output_token_ids == expected, rid
        assert s.finish_reason is FinishReason.LENGTH
