"""The multi-LoRA op: add each token's own adapter delta to a base projection's output.

Tokens arrive grouped in contiguous segments that share a slot (the runner orders sequences by
adapter) — SGMV semantics:

    for s in range(num_segments):
        rows, k = slice(seg_indptr[s], seg_indptr[s + 1]), seg_slots[s]
        if k != EMPTY: y[rows] += scaling[k] * (x[rows] @ A[k, :rank[k]].T) @ B[k, :, :rank[k]].T

A decode step over many adapters is mostly one-token segments: one matmul pair per segment would be
thousands of tiny calls per step (segments × modules × layers). So short segments are padded to a
common length and run as one batched matmul pair over their gathered slots (BGMV-like), while long
segments (prefill chunks) keep a matmul pair each, where padding would waste more than a call costs.
The index tensors of that split are planned once per step (`plan_segments`) and shared by every module.

The delta is computed in float32 and added to the base output in float32 before casting back, which is
how PEFT does it: needed for token-level parity with PEFT in low precision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from services.inference.engine.lora.slots import EMPTY

SHORT_SEGMENT = 16
"""Segments up to this many tokens are batched; longer ones run alone."""


@dataclass(frozen=True)
class SegmentPlan:
    """S short segments padded to L tokens, N valid tokens among them, and the long segments."""

    short_slots: torch.Tensor  # [S] int64
    short_rows: torch.Tensor  # [S * L] int64: token of each padded position (padding → token 0)
    valid: torch.Tensor  # [S * L] bool
    valid_rows: torch.Tensor  # [N] int64: short_rows[valid]
    valid_slots: torch.Tensor  # [N] int64: the slot of each of those tokens (for per-token kernels)
    slot_scaling: torch.Tensor  # [n_slots] float32
    short_scale: torch.Tensor  # [S, 1, 1] float32
    short_len: int  # L
    short_rank: int  # the largest rank among the short segments' slots
    long: tuple[tuple[int, int, int], ...]  # (start, end, slot) of each long segment
    ranks: tuple[int, ...]  # per slot
    scaling: tuple[float, ...]  # per slot

    @property
    def num_short(self) -> int:
        return int(self.short_slots.shape[0])


LoRAOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "SegmentPlan"], None]
"""(y [T, d_out] updated in place, x [T, d_in], A [n_slots, r_max, d_in], B [n_slots, d_out, r_max], plan)"""


def plan_segments(
    seg_indptr: Sequence[int],
    seg_slots: Sequence[int],
    scaling: Sequence[float],
    ranks: Sequence[int],
    device: torch.device,
) -> SegmentPlan:
    short: list[tuple[int, int, int]] = []
    long: list[tuple[int, int, int]] = []
    for s, k in enumerate(seg_slots):
        start, end = seg_indptr[s], seg_indptr[s + 1]
        if k == EMPTY or ranks[k] == 0 or start == end:
            continue
        (short if end - start <= SHORT_SEGMENT else long).append((start, end, k))
    length = max((end - start for start, end, _ in short), default=0)
    rows = [start + i if start + i < end else 0 for start, end, _ in short for i in range(length)]
    valid = [start + i < end for start, end, _ in short for i in range(length)]
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    valid_t = torch.tensor(valid, dtype=torch.bool, device=device)
    slots = [k for _, _, k in short]
    token_slots = [k for start, end, k in short for _ in range(end - start)]
    return SegmentPlan(
        short_slots=torch.tensor(slots, dtype=torch.long, device=device),
        short_rows=rows_t,
        valid=valid_t,
        valid_rows=rows_t[valid_t],
        valid_slots=torch.tensor(token_slots, dtype=torch.long, device=device),
        slot_scaling=torch.tensor(list(scaling), dtype=torch.float32, device=device),
        short_scale=torch.tensor([scaling[k] for k in slots], dtype=torch.float32, device=device).view(
            -1, 1, 1
        ),
        short_len=length,
        short_rank=max((ranks[k] for k in slots), default=0),
        long=tuple(long),
        ranks=tuple(ranks),
        scaling=tuple(scaling),
    )


def long_segments(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: SegmentPlan
) -> None:
    """One matmul pair per long segment (a prefill chunk): big enough to use the GEMM well."""
    for start, end, k in plan.long:
        r = plan.ranks[k]
        hidden = F.linear(x[start:end].to(a.dtype), a[k, :r])  # [n, r]
        delta = F.linear(hidden, b[k, :, :r]) * plan.scaling[k]  # [n, d_out]
        y[start:end] = (y[start:end].to(delta.dtype) + delta).to(y.dtype)


def lora_segment(
    y: torch.Tensor,  # [T, d_out], updated in place
    x: torch.Tensor,  # [T, d_in]
    a: torch.Tensor,  # [n_slots, r_max, d_in]
    b: torch.Tensor,  # [n_slots, d_out, r_max]
    plan: SegmentPlan,
) -> None:
    long_segments(y, x, a, b, plan)
    if not plan.num_short:
        return
    num, length, r = plan.num_short, plan.short_len, plan.short_rank
    # Slots of a lower rank are zero past it (the pool writes them so): padding the rank adds zeros.
    xs = x.index_select(0, plan.short_rows).view(num, length, -1).to(a.dtype)  # [S, L, d_in]
    a_short = a[:, :r].index_select(0, plan.short_slots)  # [S, r, d_in]
    b_short = b[:, :, :r].index_select(0, plan.short_slots)  # [S, d_out, r]
    hidden = torch.bmm(xs, a_short.transpose(1, 2))  # [S, L, r]
    delta = torch.bmm(hidden, b_short.transpose(1, 2)) * plan.short_scale  # [S, L, d_out]
    delta = delta.view(num * length, -1)[plan.valid]  # [N, d_out]
    rows = plan.valid_rows
    y.index_copy_(0, rows, (y.index_select(0, rows).to(delta.dtype) + delta).to(y.dtype))
