"""The multi-LoRA op: add each token's own adapter delta to a base projection's output.

Tokens arrive grouped in contiguous segments that share a slot (the runner orders sequences by
adapter), so each segment costs one small matmul pair — SGMV semantics:

    for s in range(num_segments):
        rows, k = slice(seg_indptr[s], seg_indptr[s + 1]), seg_slots[s]
        if k != EMPTY: y[rows] += scaling[k] * (x[rows] @ A[k, :rank[k]].T) @ B[k, :, :rank[k]].T

The delta is computed in float32 and added to the base output in float32 before casting back, which is
how PEFT does it: needed for token-level parity with PEFT in low precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from services.inference.engine.lora.slots import EMPTY


def lora_segment(
    y: torch.Tensor,  # [T, d_out], updated in place
    x: torch.Tensor,  # [T, d_in]
    a: torch.Tensor,  # [n_slots, r_max, d_in]
    b: torch.Tensor,  # [n_slots, d_out, r_max]
    scaling: Sequence[float],  # n_slots
    ranks: Sequence[int],  # n_slots
    seg_indptr: Sequence[int],  # num_segments + 1
    seg_slots: Sequence[int],  # num_segments
) -> None:
    for s, k in enumerate(seg_slots):
        if k == EMPTY or ranks[k] == 0:
            continue
        start, end = seg_indptr[s], seg_indptr[s + 1]
        if start == end:
            continue
        r = ranks[k]
        hidden = F.linear(x[start:end].to(a.dtype), a[k, :r])  # [n, r]
        delta = F.linear(hidden, b[k, :, :r]) * scaling[k]  # [n, d_out]
        y[start:end] = (y[start:end].to(delta.dtype) + delta).to(y.dtype)
