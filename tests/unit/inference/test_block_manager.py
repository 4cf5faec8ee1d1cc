"""Block accounting and prefix caching, on ints only."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.sequence import Sequence


def seq(tokens: list[int], adapter: str | None = None) -> Sequence:
    return Sequence(f"r{tokens[:3]}", tokens, adapter_key=adapter)


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Allocate for the whole sequence and mark it computed, as a finished prefill would."""
    assert bm.allocate(s, bm.lookup_prefix(s), s.num_tokens)
    s.num_computed_tokens = s.num_tokens
    bm.cache_full_blocks(s)
    return s


def all_free(bm: BlockManager) -> bool:
    bm.check_consistency()
    return bm.num_free_blocks == bm.num_blocks


def test_policy_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import services.inference.engine.scheduler, services.inference.engine.block_manager\n"
        "assert 'torch' not in sys.modules, 'scheduler pulls in torch'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_allocate_and_free_account_every_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(10)))
    assert bm.allocate(a, [], 10)
    assert len(a.block_table) == 3 and bm.num_free_blocks == 5
    assert all(bm.ref_count(b) == 1 for b in a.block_table)
    assert bm.grow(a, 13) and len(a.block_table) == 4
    assert bm.grow(a, 16) and len(a.block_table) == 4, "a block is only added when one is full"
    bm.free(a)
    assert a.block_table == [] and a.num_computed_tokens == 0
    assert all_free(bm)


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = seq([1] * 12), seq([2] * 8)
    assert bm.allocate(a, [], 12)
    assert not bm.can_allocate(b, [], 8)
    assert not bm.allocate(b, [], 8)
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert not bm.grow(a, 20) and len(a.block_table) == 3
    bm.free(a)
    assert all_free(bm)


def test_sequence_with_shared_prefix_reuses_full_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    system = list(range(100, 108))  # two full blocks
    a = computed(bm, seq([*system, 1, 2, 3]))
    b = seq([*system, 9, 9])
    hits = bm.lookup_prefix(b)
    assert hits == a.block_table[:2]
    assert bm.allocate(b, hits, b.num_tokens)
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert [bm.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert bm.prefix_hits == 2
    bm.free(a)
    assert [bm.ref_count(x) for x in b.block_table] == [1, 1, 1]
    bm.free(b)
    assert all_free(bm)


def test_freed_prefix_blocks_stay_reusable_until_needed() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = computed(bm, seq(list(range(9))))
    first, second, partial = a.block_table
    bm.free(a)
    assert all_free(bm) and bm.num_cached_blocks == 2
    assert bm.lookup_prefix(seq(list(range(9)))) == [first, second]
    # Fresh blocks come first from the unkeyed partial block, then from the never-used block, then
    # from the cached ones, tail of the prefix before its head.
    c = seq([50] * 12)
    assert bm.allocate(c, [], 12)
    assert c.block_table[0] == partial and c.block_table[2] == second
    assert bm.num_cached_blocks == 1
    assert bm.lookup_prefix(seq(list(range(9)))) == [first]
    bm.free(c)
    assert all_free(bm)


def test_blocks_without_a_key_are_reused_before_cached_ones() -> None:
    bm = BlockManager(num_blocks=6, block_size=4)
    a = computed(bm, seq(list(range(8))))
    cached = list(a.block_table)
    b = seq([7, 7])
    assert bm.allocate(b, [], 2)
    bm.free(a)
    bm.free(b)
    c = seq([3] * 16)
    assert bm.allocate(c, [], 16)
    assert set(c.block_table).isdisjoint(cached), "four fresh blocks fit without evicting the prefix"
    assert bm.lookup_prefix(seq([*range(8), 1])) == cached
    bm.free(c)
    assert all_free(bm)


def test_hits_always_leave_the_last_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = computed(bm, seq(list(range(8))))
    twin = seq(list(range(8)))
    hits = bm.lookup_prefix(twin)
    assert len(hits) == 1, "the second block holds the token whose logits are needed"
    with pytest.raises(ValueError, match="at least one token"):
        bm.allocate(twin, a.block_table[:2], 8)
    assert bm.allocate(twin, hits, 8) and twin.num_computed_tokens == 4
    bm.free(a)
    bm.free(twin)
    assert all_free(bm)


def test_prefix_match_stops_at_the_first_different_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=2)
    a = computed(bm, seq([1, 2, 3, 4, 5, 6, 7]))
    b = seq([1, 2, 3, 9, 5, 6, 7])
    assert bm.lookup_prefix(b) == a.block_table[:1]
    # Same tokens later in the sequence do not match: keys chain over the whole prefix.
    c = seq([8, 8, 3, 4, 5, 6, 7])
    assert bm.lookup_prefix(c) == []
    bm.free(a)
    assert all_free(bm)


def test_adapter_salts_the_prefix_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    base = computed(bm, seq(list(range(9))))
    assert bm.lookup_prefix(seq(list(range(9)), adapter="a1")) == []
    tuned = computed(bm, seq(list(range(9)), adapter="a1"))
    assert bm.lookup_prefix(seq(list(range(9)), adapter="a1")) == tuned.block_table[:2]
    assert bm.lookup_prefix(seq(list(range(9)))) == base.block_table[:2]
    bm.free(base)
    bm.free(tuned)
    assert all_free(bm)


def test_partial_computation_keys_only_full_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(11)))
    assert bm.allocate(a, [], 6)
    a.num_computed_tokens = 6
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 1
    assert bm.grow(a, 11)
    a.num_computed_tokens = 11
    bm.cache_full_blocks(a)
    assert bm.num_cached_blocks == 2
    assert bm.lookup_prefix(seq(list(range(11)))) == a.block_table[:2]
    bm.free(a)
    assert all_free(bm)


def test_identical_prompts_computed_in_one_step_keep_one_cache_entry() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq(list(range(5))), seq(list(range(5)))
    for s in (a, b):
        assert bm.allocate(s, bm.lookup_prefix(s), 5)
    for s in (a, b):
        s.num_computed_tokens = 5
        bm.cache_full_blocks(s)
    assert bm.num_cached_blocks == 1
    assert bm.lookup_prefix(seq(list(range(6)))) == a.block_table[:1]
    bm.free(a)
    bm.free(b)
    assert all_free(bm)


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = computed(bm, seq(list(range(9))))
    assert bm.lookup_prefix(seq(list(range(9)))) == [] and bm.num_cached_blocks == 0
    bm.free(a)
    assert all_free(bm)


def test_freeing_twice_is_harmless_and_refcounts_never_go_negative() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = seq([1, 2, 3])
    assert bm.allocate(a, [], 3)
    bm.free(a)
    bm.free(a)
    assert all_free(bm)


def test_invalid_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)
