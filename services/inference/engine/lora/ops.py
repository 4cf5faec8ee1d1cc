"""The multi-LoRA op: add each token's own adapter delta to a base projection's output.

Tokens arrive grouped in contiguous segments that share a slot (the runner orders sequences by
adapter) — SGMV semantics:

    for s in range(num_segments):
        rows, k = slice(seg_indptr[s], seg_indptr[s + 1]), seg_slots[s]
        if k != EMPTY: y[rows] += scaling[k] * (x[rows] @ A[k, :rank[k]].T) @ B[k, :, :rank[k]].T

One matmul pair per segment would be thousands of small calls per step (segments × modules ×
layers), so segments run batched:
- on CPU, **by token** (`TokenBags`), where the pool stores A and B row-wise (`bags_fit`): each token is
  one bag of `F.embedding_bag` over the slot buffers as they are, the shrink summing its slot's rows
  of Aᵀ weighted by the token's inputs and the expand its slot's rows of B weighted by its hidden
  values. No weights are copied and nothing is padded, so each distinct adapter's bytes are read
  about once a step, which is what bounds this op on a CPU; and only the rank dims the module's
  adapters in the step hold are read (`RANK_CHUNK`), however wide the slots. Measured
  (`bench/RESULTS.md`): a SmolLM2 decode step with 42 distinct rank-16 adapters on q/k/v/o, 57 ms
  as padded matmul pairs, 38 as bags, against ~11 for reading their 310 MB once
  (`bench/step_bench.py`); a 512-token prefill step of 12 adapters with chunks of 20–64 tokens,
  120 → 49 ms; chunks of one length, within ±15% either way. The `cpu` op (`cpu_kernel.py`) runs this
  plan compiled, one call per module, with the same sums in the same order.
- otherwise, as batched matmul pairs over padded groups (`PaddedSegments`):
  - **short segments** (a decode step's), one group, laid out one of two ways:
    - **by slot**, when most slots serve the step: every slot's tokens padded to a common length and
      multiplied against the slot buffers as they are, with no copy of their weights.
    - **by segment**, when few slots serve it: each segment padded to a common length against its
      gathered slot's A and B (BGMV-like), so idle slots cost nothing.
  - **long segments** (prefill chunks), by segment, in groups of lengths within a power of two of
    each other, so padding at most doubles a group's rows: a group's gathers and two batched matmuls
    cost 30–48% less on CPU than a matmul pair per segment (`bench/RESULTS.md`).
Padding positions read token 0 and are masked to zero before the expand, so they add exact zeros.
The index tensors are planned once per step (`plan_segments`) and shared by every module.

With float32 slots (`lora_dtype=float32`, the default) the delta is computed in float32 and added to
the base output in float32 before casting back, which is how PEFT does it: needed for token-level parity
with PEFT in low precision. Slots in the model's dtype are computed in that dtype here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from services.inference.engine.lora.slots import EMPTY

SHORT_SEGMENT = 16
"""Segments up to this many tokens form the short group; longer ones are grouped by length."""

RANK_CHUNK = 16
"""The by-token shrink reads a slot's rank dims in chunks of up to this many (one 64-byte cache line
in float32), and only the chunks the module's rank in the step needs: slots allocated at a larger
`r_max` then cost what the adapters' own ranks cost. Measured (`bench/RESULTS.md`): a SmolLM2 decode
step's 120 q/k/v/o modules with rank-16 adapters in slots of rank 64, 135 ms reading every rank dim
against 32 ms reading the first chunk; 29 ms with slots of rank 16."""

Segment = tuple[int, int, int]  # (start, end, slot)


@dataclass(frozen=True)
class PaddedSegments:
    """G groups of tokens padded to L positions each, every group against one slot's A and B."""

    slots: torch.Tensor | None  # [G] int64: each group's slot; None: G = n_slots, group k is slot k
    rows: torch.Tensor  # [G * L] int64: token of each position (padding → token 0)
    mask: torch.Tensor  # [G, L, 1] float32: 1 at a real token, 0 at padding
    scale: torch.Tensor  # [G, 1, 1] float32: each group's slot scaling
    valid_positions: torch.Tensor  # [N] int64: positions holding a real token, in `valid_rows` order
    valid_rows: torch.Tensor  # [N] int64: the token at each of those positions
    length: int  # L
    rank: int  # the largest rank among the groups' slots


@dataclass(frozen=True)
class TokenBags:
    """Every token with an adapter, one by one, for `F.embedding_bag` over the slot buffers seen as
    flat tables of rows. The bags are made at first use for each shape and shared by every module of
    the step with that shape."""

    rows: torch.Tensor  # [N] int64: each token's row in T
    slots: torch.Tensor  # [N] int64: each token's slot
    scale: torch.Tensor  # [N, 1] float32: each token's slot scaling
    all_rows: bool  # rows = 0 … T-1: the deltas line up with y as they are
    _bags: dict[tuple[str, int, int, int], tuple[torch.Tensor, torch.Tensor]]  # shape -> (indices, offsets)

    def shrink(self, d_in: int, chunks: int, used: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags over Aᵀ stored `[n_slots, d_in, r_max]` and seen as rows of `r_max / chunks` values:
        one bag per token and used chunk, that chunk of the token's slot's d_in rows (flat row
        `(slot · d_in + i) · chunks + chunk`), token after token, chunk after chunk, so that the sums
        line up as `[N, used · chunk width]`. int32: a step reads these once per module, and they are
        as many as the inputs."""
        key = ("shrink", d_in, chunks, used)
        if key not in self._bags:
            slots = self.slots.to(torch.int32)
            first = (slots[:, None] * d_in + _span(d_in, slots)) * chunks  # [N, d_in]: each row's chunk 0
            self._bags[key] = _bags_of((first[:, None, :] + _span(used, slots)[None, :, None]).view(-1), d_in)
        return self._bags[key]

    def expand(self, r_max: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Bags over B stored `[n_slots, r_max, d_out]`: each token's slot's first `width` rows."""
        key = ("expand", r_max, width, 0)
        if key not in self._bags:
            slots = self.slots.to(torch.int32)
            self._bags[key] = _bags_of((slots[:, None] * r_max + _span(width, slots)).view(-1), width)
        return self._bags[key]


def _span(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int32, device=like.device)


def _bags_of(indices: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indices and where each bag of `size` of them starts."""
    return indices, torch.arange(0, indices.numel(), size, dtype=torch.int32, device=indices.device)


@dataclass(frozen=True)
class SegmentPlan:
    """The step's segments as the ops run them."""

    num_short: int  # short segments
    short: PaddedSegments | None  # the short segments' tokens, by slot or by segment
    bags: TokenBags | None  # every segment's tokens, by token (a `by-token` plan: nothing padded then)
    long_groups: tuple[PaddedSegments, ...]  # the long segments, by length
    valid_rows: torch.Tensor  # [N] int64: the short segments' tokens (for per-token kernels)
    valid_slots: torch.Tensor  # [N] int64: the slot of each of those tokens
    slot_scaling: torch.Tensor  # [n_slots] float32
    short_rank: int  # the largest rank among the short segments' slots
    ranks: tuple[int, ...]  # per slot
    scaling: tuple[float, ...]  # per slot

    @property
    def by_slot(self) -> bool:
        return self.short is not None and self.short.slots is None


LoRAOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, "SegmentPlan", "int | None"], None]
"""(y [T, d_out] updated in place, x [T, d_in], A [n_slots, r_max, d_in], B [n_slots, d_out, r_max], plan,
rank: the most rank dims any of the step's slots holds in this module, None for r_max)"""


def plan_segments(
    seg_indptr: Sequence[int],
    seg_slots: Sequence[int],
    scaling: Sequence[float],
    ranks: Sequence[int],
    device: torch.device,
    layout: Literal["by-token", "auto", "by-slot", "by-segment"] = "auto",
) -> SegmentPlan:
    """`by-token` plans every segment as bags (for buffers that `bags_fit`: the pool asks for it
    then), and nothing padded; the others plan padded groups, `auto` laying the short segments out
    the cheaper way, `by-slot` and `by-segment` forcing one (tests)."""
    short: list[Segment] = []
    long: list[Segment] = []
    for s, k in enumerate(seg_slots):
        start, end = seg_indptr[s], seg_indptr[s + 1]
        if k == EMPTY or ranks[k] == 0 or start == end:
            continue
        (short if end - start <= SHORT_SEGMENT else long).append((start, end, k))
    slot_scaling = torch.tensor(list(scaling), dtype=torch.float32, device=device)
    bags = None
    padded = None
    long_groups: tuple[PaddedSegments, ...] = ()
    if layout == "by-token":
        if short or long:
            bags = _token_bags(sorted(short + long), seg_indptr[-1], slot_scaling, device)
    else:
        if layout != "by-segment":
            padded = _by_slot(short, len(scaling), scaling, ranks, device, forced=layout == "by-slot")
        if padded is None and short:
            padded = _by_segment(short, scaling, ranks, device)
        by_length: dict[int, list[Segment]] = {}
        for segment in long:
            by_length.setdefault((segment[1] - segment[0] - 1).bit_length(), []).append(segment)
        long_groups = tuple(_by_segment(group, scaling, ranks, device) for group in by_length.values())
    return SegmentPlan(
        num_short=len(short),
        short=padded,
        bags=bags,
        long_groups=long_groups,
        valid_rows=torch.tensor(
            [t for start, end, _ in short for t in range(start, end)], dtype=torch.long, device=device
        ),
        valid_slots=torch.tensor(
            [k for start, end, k in short for _ in range(end - start)], dtype=torch.long, device=device
        ),
        slot_scaling=slot_scaling,
        short_rank=max((ranks[k] for _, _, k in short), default=0),
        ranks=tuple(ranks),
        scaling=tuple(scaling),
    )


def _token_bags(
    segments: list[Segment], num_tokens: int, slot_scaling: torch.Tensor, device: torch.device
) -> TokenBags:
    rows = [t for start, end, _ in segments for t in range(start, end)]
    slots = torch.tensor([k for start, end, k in segments for _ in range(end - start)], device=device)
    return TokenBags(
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        slots=slots,
        scale=slot_scaling.index_select(0, slots)[:, None],
        all_rows=rows == list(range(num_tokens)),
        _bags={},
    )


def _padded(
    groups: list[list[int]], slots: list[int] | None, scale: list[float], rank: int, device: torch.device
) -> PaddedSegments:
    """Each group's tokens padded to the longest group's count."""
    length = max(len(tokens) for tokens in groups)
    rows: list[int] = []
    mask: list[float] = []
    positions: list[int] = []
    valid: list[int] = []
    for g, tokens in enumerate(groups):
        positions.extend(range(g * length, g * length + len(tokens)))
        valid.extend(tokens)
        rows.extend(tokens + [0] * (length - len(tokens)))
        mask.extend([1.0] * len(tokens) + [0.0] * (length - len(tokens)))
    return PaddedSegments(
        slots=None if slots is None else torch.tensor(slots, dtype=torch.long, device=device),
        rows=torch.tensor(rows, dtype=torch.long, device=device),
        mask=torch.tensor(mask, dtype=torch.float32, device=device).view(len(groups), length, 1),
        scale=torch.tensor(scale, dtype=torch.float32, device=device).view(-1, 1, 1),
        valid_positions=torch.tensor(positions, dtype=torch.long, device=device),
        valid_rows=torch.tensor(valid, dtype=torch.long, device=device),
        length=length,
        rank=rank,
    )


def _by_segment(
    segments: list[Segment], scaling: Sequence[float], ranks: Sequence[int], device: torch.device
) -> PaddedSegments:
    return _padded(
        [list(range(start, end)) for start, end, _ in segments],
        [k for _, _, k in segments],
        [scaling[k] for _, _, k in segments],
        max(ranks[k] for _, _, k in segments),
        device,
    )


def _by_slot(
    short: list[Segment],
    num_slots: int,
    scaling: Sequence[float],
    ranks: Sequence[int],
    device: torch.device,
    forced: bool = False,
) -> PaddedSegments | None:
    """The by-slot layout of the short segments, or None where it would pad to more than 1.25 times the
    by-segment layout's positions (a quarter or more of the slots idle, or one slot with far more tokens
    than the rest). The by-slot layout reads every slot's weights from memory, the by-segment one copies
    those of the segments' slots; on CPU, with SmolLM2 and rank 16, the by-slot layout was 20% cheaper
    with 30 of 32 slots in use and 10% dearer with 42 of 64."""
    if not short:
        return None
    by_slot: list[list[int]] = [[] for _ in range(num_slots)]
    for start, end, k in short:
        by_slot[k].extend(range(start, end))
    length = max(len(tokens) for tokens in by_slot)
    segment_length = max(end - start for start, end, _ in short)
    if not forced and 4 * num_slots * length > 5 * len(short) * segment_length:
        return None
    rank = max(ranks[k] for _, _, k in short)
    return _padded(by_slot, None, list(scaling), rank, device)


def long_groups(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    plan: SegmentPlan,
    rank: int | None = None,
) -> None:
    """The long segments (prefill chunks) alone, for ops whose own kernels take the short ones."""
    for group in plan.long_groups:
        _apply_padded(y, x, a, b, group, rank)


def lora_segment(
    y: torch.Tensor,  # [T, d_out], updated in place
    x: torch.Tensor,  # [T, d_in]
    a: torch.Tensor,  # [n_slots, r_max, d_in]
    b: torch.Tensor,  # [n_slots, d_out, r_max]
    plan: SegmentPlan,
    rank: int | None = None,  # no slot of the step holds more rank dims in this module (None: r_max)
) -> None:
    if plan.bags is not None:
        _apply_bags(y, x, a, b, plan.bags, a.shape[1] if rank is None else rank)
        return
    long_groups(y, x, a, b, plan, rank)
    if plan.short is not None:
        _apply_padded(y, x, a, b, plan.short, rank)


@functools.cache
def rank_chunk(r_max: int) -> int:
    """The width of the rows the by-token shrink reads: the largest divisor of `r_max` up to
    `RANK_CHUNK`, so that a slot's rank dims are whole chunks."""
    return max(c for c in range(1, min(r_max, RANK_CHUNK) + 1) if r_max % c == 0)


def bags_fit(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the buffers are read by token in place: A stored `[n_slots, d_in, r_max]` and B stored
    `[n_slots, r_max, d_out]` (both seen transposed), so that a slot's rows are contiguous rows of
    one flat table each, on CPU. The pool stores them so for this op; other buffers would be copied
    whole into that form by every module of every step."""
    rows_of_a, rows_of_b = a.transpose(1, 2), b.transpose(1, 2)
    return a.device.type == "cpu" and rows_of_a.is_contiguous() and rows_of_b.is_contiguous()


def _apply_bags(
    y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bags: TokenBags, rank: int
) -> None:
    n_slots, r_max, d_in = a.shape
    d_out = b.shape[1]
    chunk = rank_chunk(r_max)
    chunks, used = r_max // chunk, -(-rank // chunk)
    a_rows = a.transpose(1, 2).reshape(-1, chunk)  # views: row (s·d_in + i)·chunks + c is a chunk of Aᵀ[s, i]
    b_rows = b.transpose(1, 2).reshape(n_slots * r_max, d_out)  # row s·r_max + j is Bᵀ[s, j]
    xs = (x if bags.all_rows else x.index_select(0, bags.rows)).to(a.dtype)
    weights = xs.reshape(-1) if used == 1 else xs[:, None, :].expand(-1, used, -1).reshape(-1)
    indices, offsets = bags.shrink(d_in, chunks, used)
    hidden = F.embedding_bag(indices, a_rows, offsets, mode="sum", per_sample_weights=weights)
    hidden = hidden.view(xs.shape[0], used * chunk).mul_(bags.scale)
    indices, offsets = bags.expand(r_max, used * chunk)
    delta = F.embedding_bag(indices, b_rows, offsets, mode="sum", per_sample_weights=hidden.view(-1))
    if bags.all_rows:
        # A low-precision y is summed with the float32 delta in float32 and rounded once, as PEFT does:
        # one mixed-dtype add, a third of the cost of `_add_rounding_once`'s gather, cast and scatter.
        y.add_(delta)
    elif y.dtype == delta.dtype:
        y.index_add_(0, bags.rows, delta)
    else:
        _add_rounding_once(y, bags.rows, delta)


def _apply_padded(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    p: PaddedSegments,
    rank: int | None = None,
) -> None:
    # [n_slots, d_in, r] and [n_slots, r, d_out]: as the pool stores them for this op (the rank cut
    # first, so a gather copies no more than the groups' ranks).
    r = p.rank if rank is None else min(p.rank, rank)
    a_t, b_p = a.transpose(1, 2)[:, :, :r], b.transpose(1, 2)[:, :r]
    if p.slots is not None:
        a_t, b_p = a_t.index_select(0, p.slots), b_p.index_select(0, p.slots)
    groups = a_t.shape[0]
    xs = x.index_select(0, p.rows).view(groups, p.length, -1).to(a.dtype)  # [G, L, d_in]
    hidden = torch.bmm(xs, a_t).mul_(p.mask)  # [G, L, r], in the slots' dtype
    delta = torch.bmm(hidden, b_p)  # [G, L, d_out]
    delta.mul_(p.scale)
    flat = delta.view(groups * p.length, -1)
    if y.dtype == flat.dtype:
        y.index_add_(0, p.rows, flat)  # padding adds exact zeros to token 0
        return
    _add_rounding_once(y, p.valid_rows, flat.index_select(0, p.valid_positions))


def _add_rounding_once(y: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> None:
    """y[rows] += delta for a low-precision y: the sum is taken in float32 and rounded once, as PEFT
    does."""
    y.index_copy_(0, rows, (y.index_select(0, rows).to(delta.dtype) + delta).to(y.dtype))
