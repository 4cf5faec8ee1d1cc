"""The multi-LoRA op: add each token's own adapter delta to a base projection's output.

Tokens arrive grouped in contiguous segments that share a slot (the runner orders sequences by
adapter) — SGMV semantics:

    for s in range(num_segments):
        rows, k = slice(seg_indptr[s], seg_indptr[s + 1]), seg_slots[s]
        if k != EMPTY: y[rows] += scaling[k] * (x[rows] @ A[k, :rank[k]].T) @ B[k, :, :rank[k]].T

A decode step over many adapters is mostly one-token segments: one matmul pair per segment would be
thousands of tiny calls per step (segments × modules × layers). So short segments run as one batched
matmul pair, while long segments (prefill chunks) keep a matmul pair each, where padding would waste
more than a call costs. The short tokens are laid out one of two ways:
- **by slot** (`DenseShort`), when most slots serve the step (a decode batch over many adapters): every
  slot's tokens padded to a common length, multiplied against the slot buffers as they are. Gathering
  each segment's A and B would copy about as many weights as the buffers hold, in every module of
  every step: on CPU that copy cost more than the matmuls.
- **by segment**, when few slots serve it: each segment padded to a common length against its gathered
  slot's A and B (BGMV-like), so idle slots cost nothing.
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
class DenseShort:
    """The short tokens laid out by slot: every slot padded to L positions, [n_slots * L] in all."""

    rows: torch.Tensor  # [n_slots * L] int64: token of each position (padding → token 0)
    mask: torch.Tensor  # [n_slots, L, 1] float32: 1 at a real token, 0 at padding (and unused slots)
    valid_positions: torch.Tensor  # [N] int64: positions holding a real token, in `valid_rows` order
    valid_rows: torch.Tensor  # [N] int64: the token at each of those positions
    length: int  # L


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
    dense: DenseShort | None = None  # the short tokens by slot, when that is the cheaper layout

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
    valid_rows = rows_t[valid_t]
    return SegmentPlan(
        short_slots=torch.tensor(slots, dtype=torch.long, device=device),
        short_rows=rows_t,
        valid=valid_t,
        valid_rows=valid_rows,
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
        dense=_dense_short(short, length, len(scaling), device),
    )


def _dense_short(
    short: list[tuple[int, int, int]], segment_length: int, num_slots: int, device: torch.device
) -> DenseShort | None:
    """The by-slot layout of the short segments, or None where it would pad to more than 1.25 times the
    by-segment layout's positions (a quarter or more of the slots idle, or one slot with far more tokens
    than the rest). The by-slot layout reads every slot's weights from memory, the by-segment one copies
    those of the segments' slots; on CPU, with SmolLM2 and rank 16, the by-slot layout was 20% cheaper
    with 30 of 32 slots in use and 10% dearer with 42 of 64."""
    by_slot: dict[int, list[int]] = {}
    for start, end, k in short:
        by_slot.setdefault(k, []).extend(range(start, end))
    if not by_slot:
        return None
    length = max(len(tokens) for tokens in by_slot.values())
    if 4 * num_slots * length > 5 * len(short) * segment_length:
        return None
    rows = [0] * (num_slots * length)
    mask = [0.0] * (num_slots * length)
    positions: list[int] = []
    tokens: list[int] = []
    for k, slot_tokens in by_slot.items():
        for i, token in enumerate(slot_tokens):
            rows[k * length + i] = token
            mask[k * length + i] = 1.0
            positions.append(k * length + i)
            tokens.append(token)
    return DenseShort(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        mask=torch.tensor(mask, dtype=torch.float32, device=device).view(num_slots, length, 1),
        valid_positions=torch.tensor(positions, dtype=torch.long, device=device),
        valid_rows=torch.tensor(tokens, dtype=torch.long, device=device),
        length=length,
    )


def long_segments(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: SegmentPlan
) -> None:
    """One matmul pair per long segment (a prefill chunk): big enough to use the GEMM well."""
    b_rows = b.transpose(1, 2)  # [n_slots, r_max, d_out]: contiguous in the pool's storage for this op
    for start, end, k in plan.long:
        r = plan.ranks[k]
        hidden = F.linear(x[start:end].to(a.dtype), a[k, :r])  # [n, r]
        delta = torch.mm(hidden, b_rows[k, :r]) * plan.scaling[k]  # [n, d_out]
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
    if plan.dense is not None:
        _short_by_slot(y, x, a, b, plan, plan.dense)
        return
    num, length, r = plan.num_short, plan.short_len, plan.short_rank
    # Slots of a lower rank are zero past it (the pool writes them so): padding the rank adds zeros.
    xs = x.index_select(0, plan.short_rows).view(num, length, -1).to(a.dtype)  # [S, L, d_in]
    a_short = a[:, :r].index_select(0, plan.short_slots)  # [S, r, d_in]
    b_short = b.transpose(1, 2)[:, :r].index_select(0, plan.short_slots)  # [S, r, d_out]
    hidden = torch.bmm(xs, a_short.transpose(1, 2))  # [S, L, r]
    delta = torch.bmm(hidden, b_short) * plan.short_scale  # [S, L, d_out]
    delta = delta.view(num * length, -1)[plan.valid]  # [N, d_out]
    rows = plan.valid_rows
    y.index_copy_(0, rows, (y.index_select(0, rows).to(delta.dtype) + delta).to(y.dtype))


def _short_by_slot(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, plan: SegmentPlan, dense: DenseShort
) -> None:
    """The short tokens against every slot's A and B in place: no weight is copied. Padding positions
    read token 0 and are masked to zero before the expand, so their delta is exactly zero."""
    num_slots, length, r = a.shape[0], dense.length, plan.short_rank
    xs = x.index_select(0, dense.rows).view(num_slots, length, -1).to(a.dtype)  # [n_slots, L, d_in]
    hidden = torch.bmm(xs, a[:, :r].transpose(1, 2)) * dense.mask  # [n_slots, L, r]
    delta = torch.bmm(hidden, b.transpose(1, 2)[:, :r])  # [n_slots, L, d_out]
    delta.mul_(plan.slot_scaling.view(-1, 1, 1))
    flat = delta.view(num_slots * length, -1)
    if y.dtype == flat.dtype:
        y.index_add_(0, dense.rows, flat)  # padding adds exact zeros to token 0
        return
    # In low precision the sum is taken in float32 and rounded once, as PEFT does.
    rows = dense.valid_rows
    flat = flat.index_select(0, dense.valid_positions)
    y.index_copy_(0, rows, (y.index_select(0, rows).to(flat.dtype) + flat).to(y.dtype))
