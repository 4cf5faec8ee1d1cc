"""The benchmark workload of TARGETS.md: seeded, in range, shaped as specified, and replayable from disk."""

from __future__ import annotations

import itertools
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from bench.workload import WorkloadSpec, generate, read_jsonl, write_jsonl


def test_same_spec_same_requests_and_seed_changes_them() -> None:
    spec = WorkloadSpec(n=20, vocab_size=1000)
    assert generate(spec) == generate(spec)
    assert generate(spec) != generate(replace(spec, seed=7))


def test_requests_stay_in_their_ranges() -> None:
    spec = WorkloadSpec(
        n=300, num_adapters=7, input_len=(5, 9), output_len=(2, 4), vocab_size=50, first_token_id=3
    )
    requests = generate(spec)
    assert len(requests) == 300 and len({r.request_id for r in requests}) == 300
    assert requests[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(requests))
    assert {len(r.prompt_token_ids) for r in requests} == {5, 6, 7, 8}, "hi is exclusive"
    assert {r.max_new_tokens for r in requests} == {2, 3}
    assert {r.adapter_index for r in requests} == set(range(7))
    tokens = {t for r in requests for t in r.prompt_token_ids}
    assert min(tokens) >= 3 and max(tokens) < 50


def test_arrival_gaps_follow_the_rate_and_burstiness() -> None:
    def gaps(cv: float) -> list[float]:
        requests = generate(WorkloadSpec(n=4000, rate=8.0, cv=cv, vocab_size=10, input_len=(1, 2)))
        return [b.arrival_s - a.arrival_s for a, b in itertools.pairwise(requests)]

    for cv in (1.0, 3.0):
        g = gaps(cv)
        mean = statistics.fmean(g)
        # Gamma(1/cv², cv²/rate): mean 1/rate, coefficient of variation cv (5% sampling slack).
        assert mean == pytest.approx(1 / 8.0, rel=0.05 * cv)
        assert statistics.pstdev(g) / mean == pytest.approx(cv, rel=0.1)


def test_infinite_rate_is_an_offline_batch() -> None:
    requests = generate(WorkloadSpec(n=10, rate=float("inf"), vocab_size=10))
    assert {r.arrival_s for r in requests} == {0.0}


def test_alpha_below_one_skews_the_adapter_popularity() -> None:
    def top_share(alpha: float) -> float:
        requests = generate(
            WorkloadSpec(n=5000, num_adapters=100, alpha=alpha, vocab_size=10, input_len=(1, 2))
        )
        counts = sorted((sum(r.adapter_index == a for r in requests) for a in range(100)), reverse=True)
        return sum(counts[:10]) / len(requests)

    # power(α) has CDF x^α: uniform at α=1 (the 10 most used of 100 adapters take ~10%); at α=0.3
    # indices 0–9 take 0.1^0.3 ≈ 50% of the requests.
    assert top_share(1.0) < 0.15
    assert top_share(0.3) > 0.45


def test_jsonl_round_trip_keeps_spec_and_requests(tmp_path: Path) -> None:
    spec = WorkloadSpec(n=12, rate=float("inf"), num_adapters=1000, alpha=0.3, vocab_size=500)
    requests = generate(spec)
    path = tmp_path / "w.jsonl"
    write_jsonl(path, spec, requests)
    assert read_jsonl(path) == (spec, requests)
    assert len(path.read_text().splitlines()) == 13, "a spec line, then one line per request"


def test_invalid_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="input_len"):
        WorkloadSpec(input_len=(5, 5))
    with pytest.raises(ValueError, match="rate"):
        WorkloadSpec(rate=0)
