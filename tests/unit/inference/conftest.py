"""Fixtures of the engine's pure-Python tests: scheduler harnesses checked for leaked KV blocks."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

# The harness asserts on every step; let pytest explain those failures as it does in tests.
pytest.register_assert_rewrite("tests.unit.inference.token_store")

from tests.unit.inference.token_store import Harness  # noqa: E402


@pytest.fixture
def harnesses() -> Iterator[list[Harness]]:
    """Collects the harnesses a test makes and asserts afterwards that every KV block came back."""
    made: list[Harness] = []
    yield made
    for h in made:
        assert not h.scheduler.has_unfinished(), "test left requests behind"
        assert h.bm.num_free_blocks == h.bm.num_blocks, "KV blocks leaked"
        h.bm.check_consistency()


@pytest.fixture
def make_harness(harnesses: list[Harness]) -> Callable[..., Harness]:
    def make(*args: object, **kwargs: object) -> Harness:
        h = Harness(*args, **kwargs)  # type: ignore[arg-type]
        harnesses.append(h)
        return h

    return make
