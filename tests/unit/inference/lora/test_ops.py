"""The segment op against a plain per-token loop, with mixed ranks, base-model segments and bf16, with
every segment read by token or its short tokens laid out by slot and by segment, and A and B stored as
the pool stores them or plainly."""

from __future__ import annotations

from typing import Literal

import pytest
import torch

from services.inference.engine.lora.ops import (
    SHORT_SEGMENT,
    bags_fit,
    lora_segment,
    plan_segments,
    rank_chunk,
)
from services.inference.engine.lora.slots import EMPTY


def as_the_pool_stores(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same values in the pool's storage for this op: `[n, d_in, r]` and `[n, r, d_out]`, seen
    as `[n, r, d_in]` and `[n, d_out, r]`."""
    return a.transpose(1, 2).contiguous().transpose(1, 2), b.transpose(1, 2).contiguous().transpose(1, 2)


def reference(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scaling: list[float],
    ranks: list[int],
    token_slots: list[int],
) -> torch.Tensor:
    out = y.clone().float()
    for t, k in enumerate(token_slots):
        if k == EMPTY:
            continue
        r = ranks[k]
        out[t] += scaling[k] * (b[k, :, :r] @ (a[k, :r] @ x[t].float()))
    return out.to(y.dtype)


def segments(lengths: list[int], seg_slots: list[int]) -> tuple[list[int], list[int]]:
    """The segments' boundaries (`seg_indptr`) and the slot of every token."""
    seg_indptr = [0]
    for n in lengths:
        seg_indptr.append(seg_indptr[-1] + n)
    return seg_indptr, [k for s, k in enumerate(seg_slots) for _ in range(lengths[s])]


LONG = SHORT_SEGMENT + 5  # a prefill-like segment, run on its own rather than padded


@pytest.mark.parametrize("pool_storage", [False, True], ids=["plain", "pool-storage"])
@pytest.mark.parametrize("layout", ["by-token", "by-slot", "by-segment"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_match_a_per_token_loop(
    dtype: torch.dtype, layout: Literal["by-token", "by-slot", "by-segment"], pool_storage: bool
) -> None:
    g = torch.Generator().manual_seed(0)
    n_slots, r_max, d_in, d_out = 4, 16, 24, 40
    a = torch.randn(n_slots, r_max, d_in, generator=g)
    b = torch.randn(n_slots, d_out, r_max, generator=g)
    ranks = [8, 16, 4, 0]
    for k, r in enumerate(ranks):  # a slot's rows past its rank are zero, as the pool writes them
        a[k, r:] = 0
        b[k, :, r:] = 0
    scaling = [2.0, 0.5, 1.0, 0.0]
    seg_slots = [1, 0, EMPTY, 2, 0, 1, 2, 3, 0, 1]  # slot 3 has rank 0: nothing to add
    seg_indptr, token_slots = segments([3, 0, 7, 1, 6, 3, LONG, 1, 1, 2], seg_slots)
    total = seg_indptr[-1]
    x = torch.randn(total, d_in, generator=g).to(dtype)
    y = torch.randn(total, d_out, generator=g).to(dtype)
    expected = reference(y, x, a, b, scaling, ranks, token_slots)
    plan = plan_segments(seg_indptr, seg_slots, scaling, ranks, torch.device("cpu"))
    assert [group.valid_rows.tolist() for group in plan.long_groups] == [
        list(range(seg_indptr[6], seg_indptr[7]))
    ]
    assert plan.num_short == 6
    assert plan.by_slot  # three of four slots serve short tokens: the by-slot layout
    assert plan.bags is None  # padded: by token only when asked (the pool does for buffers that fit)
    plan = plan_segments(seg_indptr, seg_slots, scaling, ranks, torch.device("cpu"), layout=layout)
    if layout == "by-token":  # every token with an adapter, the long segment's too, and nothing padded
        with_adapters = [t for t, k in enumerate(token_slots) if k != EMPTY and ranks[k] > 0]
        assert plan.bags is not None and plan.bags.rows.tolist() == with_adapters
        assert plan.short is None and not plan.long_groups
    else:
        assert plan.bags is None
    if pool_storage:
        a, b = as_the_pool_stores(a, b)
    # Read in place by token in the pool's storage only (plainly stored buffers are copied first).
    assert bags_fit(a, b) == pool_storage
    in_float32 = y.float()
    lora_segment(y, x, a, b, plan)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected.float(), rtol=tolerance, atol=tolerance)
    lora_segment(in_float32, x, a, b, plan)  # summed in float32 and rounded once, as PEFT does
    assert torch.equal(y, in_float32.to(dtype))
    for untouched in (2, 7):  # the EMPTY segment and the rank-0 slot keep the base output bit for bit
        rows = slice(seg_indptr[untouched], seg_indptr[untouched + 1])
        assert torch.equal(y[rows], expected[rows])


@pytest.mark.parametrize("layout", ["by-token", "by-slot", "by-segment"])
def test_slots_in_a_bf16_model_dtype_run_every_layout(
    layout: Literal["by-token", "by-slot", "by-segment"],
) -> None:
    """`lora_dtype=model`: bf16 slots in the pool's storage, bf16 inputs and outputs, every layout."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 8, 24, generator=g).bfloat16()
    b = torch.randn(3, 16, 8, generator=g).bfloat16()
    ranks, scaling = [8, 4, 8], [1.0, 2.0, 0.5]
    a[1, 4:] = 0
    b[1, :, 4:] = 0
    seg_slots = [0, EMPTY, 2, 1, 0]
    seg_indptr, token_slots = segments([2, 1, 3, LONG, 1], seg_slots)
    x = torch.randn(seg_indptr[-1], 24, generator=g).bfloat16()
    y = torch.randn(seg_indptr[-1], 16, generator=g).bfloat16()
    expected = reference(y, x, a.float(), b.float(), scaling, ranks, token_slots)
    plan = plan_segments(seg_indptr, seg_slots, scaling, ranks, torch.device("cpu"), layout=layout)
    lora_segment(y, x, *as_the_pool_stores(a, b), plan)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected.float(), rtol=3e-2, atol=6e-2)
    assert torch.equal(y[2], expected[2])  # the base-model token is untouched


def test_short_tokens_go_by_segment_when_few_slots_serve_them() -> None:
    """Two one-token segments among 32 slots: padding every slot would multiply 16 times the work."""
    cpu = torch.device("cpu")
    few = plan_segments([0, 1, 2], [3, 9], [1.0] * 32, [8] * 32, cpu)
    assert not few.by_slot and few.num_short == 2
    # A decode step over most slots, one slot with three tokens: by slot, padded to three.
    indptr = [0]
    for k in range(32):
        indptr.append(indptr[-1] + (3 if k == 5 else 1))
    many = plan_segments(indptr, list(range(32)), [1.0] * 32, [8] * 32, cpu)
    assert many.by_slot and many.short is not None and many.short.length == 3
    assert many.short.rows.tolist()[5 * 3 : 6 * 3] == [5, 6, 7]


@pytest.mark.parametrize("pool_storage", [False, True], ids=["plain", "pool-storage"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_long_segments_run_in_groups_of_like_length(dtype: torch.dtype, pool_storage: bool) -> None:
    """Prefill chunks of 21, 30 and 40 tokens (two groups: 17–32 and 33–64 tokens), among short ones,
    over buffers stored plainly or as the pool stores them."""
    g = torch.Generator().manual_seed(1)
    n_slots, r_max, d_in, d_out = 3, 8, 16, 24
    a = torch.randn(n_slots, r_max, d_in, generator=g)
    b = torch.randn(n_slots, d_out, r_max, generator=g)
    ranks, scaling = [8, 4, 8], [0.5, 2.0, 1.0]
    a[1, 4:] = 0
    b[1, :, 4:] = 0
    seg_slots = [0, 1, 2, 1, EMPTY]
    seg_indptr, token_slots = segments([21, 2, 40, 30, 1], seg_slots)
    x = torch.randn(seg_indptr[-1], d_in, generator=g).to(dtype)
    y = torch.randn(seg_indptr[-1], d_out, generator=g).to(dtype)
    expected = reference(y, x, a, b, scaling, ranks, token_slots)
    plan = plan_segments(seg_indptr, seg_slots, scaling, ranks, torch.device("cpu"))
    assert sorted(group.length for group in plan.long_groups) == [30, 40]
    if pool_storage:  # padded groups over the pool's storage (its layout where triton is missing)
        a, b = as_the_pool_stores(a, b)
    lora_segment(y, x, a, b, plan)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected.float(), rtol=tolerance, atol=tolerance)
    assert torch.equal(y[-1], expected[-1])  # the base-model token is untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_decode_step_with_an_adapter_on_every_token_is_read_by_token(dtype: torch.dtype) -> None:
    """Every token of the step has a slot (the deltas line up with the output as they are); slots of
    mixed rank, some shared by several tokens, some idle."""
    g = torch.Generator().manual_seed(2)
    n_slots, r_max, d_in, d_out = 6, 8, 20, 12
    a = torch.randn(n_slots, r_max, d_in, generator=g)
    b = torch.randn(n_slots, d_out, r_max, generator=g)
    ranks, scaling = [8, 2, 8, 4, 8, 8], [1.0, 3.0, 0.5, 2.0, 1.0, 1.0]
    for k, r in enumerate(ranks):
        a[k, r:] = 0
        b[k, :, r:] = 0
    seg_slots = [3, 0, 1, 5]  # slots 2 and 4 idle
    seg_indptr, token_slots = segments([2, 1, 3, 1], seg_slots)
    x = torch.randn(seg_indptr[-1], d_in, generator=g).to(dtype)
    y = torch.randn(seg_indptr[-1], d_out, generator=g).to(dtype)
    expected = reference(y, x, a, b, scaling, ranks, token_slots)
    plan = plan_segments(seg_indptr, seg_slots, scaling, ranks, torch.device("cpu"), layout="by-token")
    assert plan.bags is not None and plan.bags.all_rows
    in_float32 = y.float()
    lora_segment(y, x, *as_the_pool_stores(a, b), plan)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.float(), expected.float(), rtol=tolerance, atol=tolerance)
    # PEFT's rounding: the base output and the delta summed in float32, then rounded once to y's dtype.
    lora_segment(in_float32, x, *as_the_pool_stores(a, b), plan)
    assert torch.equal(y, in_float32.to(dtype))


@pytest.mark.parametrize(("r_max", "rank"), [(64, 16), (40, 24), (8, 3), (16, 16)])
def test_bags_read_only_the_rank_chunks_the_module_needs(r_max: int, rank: int) -> None:
    """Slots allocated wider than the step's adapters (the worker's default rank is 64): the by-token
    op reads the first chunks of each slot covering `rank` and nothing past them, which hold zeros
    in the pool (NaN here, so that a read would show)."""
    g = torch.Generator().manual_seed(3)
    n_slots, d_in, d_out = 5, 20, 12
    ranks, scaling = [rank, max(1, rank // 2), rank, 1, rank], [1.0, 2.0, 0.5, 3.0, 1.0]
    a = torch.randn(n_slots, r_max, d_in, generator=g)
    b = torch.randn(n_slots, d_out, r_max, generator=g)
    for k, r in enumerate(ranks):
        a[k, r:] = 0
        b[k, :, r:] = 0
    seg_slots = [3, 0, EMPTY, 1, 2]  # slot 4 idle
    seg_indptr, token_slots = segments([2, 1, 2, LONG, 1], seg_slots)
    x = torch.randn(seg_indptr[-1], d_in, generator=g)
    y = torch.randn(seg_indptr[-1], d_out, generator=g)
    expected = reference(y, x, a, b, scaling, ranks, token_slots)
    read = rank_chunk(r_max) * -(-rank // rank_chunk(r_max))  # whole chunks
    assert rank <= read <= r_max and r_max % rank_chunk(r_max) == 0
    a[:, read:] = float("nan")
    b[:, :, read:] = float("nan")
    plan = plan_segments(seg_indptr, seg_slots, scaling, ranks, torch.device("cpu"), layout="by-token")
    a, b = as_the_pool_stores(a, b)
    lora_segment(y, x, a, b, plan, rank)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
