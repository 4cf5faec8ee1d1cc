"""The `triton` multi-LoRA op for CUDA: the short segments' tokens through two per-token kernels (BGMV).

Same signature and semantics as `ops.lora_segment`. A decode step's tokens each read their own slot's
A and B straight from the stacked pool buffers, so no weights are gathered into temporary tensors:
`shrink` computes h[t] = A[slot(t)] · x[t] (float32) and `expand` adds scaling · B[slot(t)] · h[t] to
y[t] in float32 before casting back, as PEFT does. Long segments (prefill chunks) run as the segment
op's groups of batched GEMM pairs, which use the tensor cores far better than a per-token kernel would
(and cost a tenth of a GEMM pair per segment on an H200: `bench/RESULTS.md`).

Imported only where triton is installed; `TRITON_INTERPRET=1` runs the kernels on CPU tensors, which is
how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from services.inference.engine.lora.ops import SegmentPlan, long_groups

BLOCK_K = 64  # input features per shrink iteration
BLOCK_N = 64  # output features per expand program


@triton.jit
def _shrink(
    x_ptr,
    a_ptr,
    rows_ptr,
    slots_ptr,
    h_ptr,
    d_in,
    rank,
    stride_x,
    stride_a_slot,
    stride_a_rank,
    stride_h,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    t = tl.program_id(0)
    row = tl.load(rows_ptr + t)
    slot = tl.load(slots_ptr + t)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, d_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        in_k = offs_k < d_in
        x = tl.load(x_ptr + row * stride_x + offs_k, mask=in_k, other=0.0).to(tl.float32)
        a = tl.load(
            a_ptr + slot * stride_a_slot + offs_r[:, None] * stride_a_rank + offs_k[None, :],
            mask=(offs_r[:, None] < rank) & in_k[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    tl.store(h_ptr + t * stride_h + offs_r, acc, mask=offs_r < rank)


@triton.jit
def _expand(
    h_ptr,
    b_ptr,
    rows_ptr,
    slots_ptr,
    scaling_ptr,
    y_ptr,
    d_out,
    rank,
    stride_h,
    stride_b_slot,
    stride_b_out,
    stride_y,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.load(rows_ptr + t)
    slot = tl.load(slots_ptr + t)
    offs_r = tl.arange(0, BLOCK_R)
    in_n = offs_n < d_out
    h = tl.load(h_ptr + t * stride_h + offs_r, mask=offs_r < rank, other=0.0)
    b = tl.load(
        b_ptr + slot * stride_b_slot + offs_n[:, None] * stride_b_out + offs_r[None, :],
        mask=in_n[:, None] & (offs_r[None, :] < rank),
        other=0.0,
    ).to(tl.float32)
    delta = tl.sum(b * h[None, :], axis=1) * tl.load(scaling_ptr + slot)
    y = tl.load(y_ptr + row * stride_y + offs_n, mask=in_n, other=0.0)
    tl.store(y_ptr + row * stride_y + offs_n, (y.to(tl.float32) + delta).to(y.dtype), mask=in_n)


def lora_bgmv(
    y: torch.Tensor,  # [T, d_out], updated in place
    x: torch.Tensor,  # [T, d_in]
    a: torch.Tensor,  # [n_slots, r_max, d_in], contiguous
    b: torch.Tensor,  # [n_slots, d_out, r_max], contiguous
    plan: SegmentPlan,
    rank: int | None = None,  # no slot of the step holds more rank dims in this module (None: r_max)
) -> None:
    long_groups(y, x, a, b, plan, rank)
    num_tokens = int(plan.valid_rows.shape[0])
    if not num_tokens:
        return
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("the triton LoRA op needs x and y rows to be contiguous")
    rank = plan.short_rank if rank is None else min(plan.short_rank, rank)
    block_r = max(16, triton.next_power_of_2(rank))
    hidden = torch.empty(num_tokens, block_r, dtype=torch.float32, device=x.device)
    d_in, d_out = x.shape[1], y.shape[1]
    _shrink[(num_tokens,)](
        x,
        a,
        plan.valid_rows,
        plan.valid_slots,
        hidden,
        d_in,
        rank,
        x.stride(0),
        a.stride(0),
        a.stride(1),
        hidden.stride(0),
        BLOCK_R=block_r,
        BLOCK_K=BLOCK_K,
    )
    _expand[(num_tokens, triton.cdiv(d_out, BLOCK_N))](
        hidden,
        b,
        plan.valid_rows,
        plan.valid_slots,
        plan.slot_scaling,
        y,
        d_out,
        rank,
        hidden.stride(0),
        b.stride(0),
        b.stride(1),
        y.stride(0),
        BLOCK_R=block_r,
        BLOCK_N=BLOCK_N,
    )
