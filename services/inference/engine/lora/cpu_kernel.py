"""The `cpu` multi-LoRA op: the plain-torch op's by-token plan (`ops.TokenBags`) in one compiled call
per module (`cpu_kernel.cpp`, built with the engine's other CPU ops by `engine/cpu_kernels.py`), with
the same sums in the same order, so float32 outputs are bit-identical to it. The plain op spends a dozen
tensor ops per module (the input's cast, two `embedding_bag`s over 64-byte rows, the scaling, the add);
the kernel reads each token's slot rows in place and adds the delta as it goes, bound by reading the
adapters' bytes. Measured (`bench/RESULTS.md`, 2026-12-04, SmolLM2 shapes, 64 decode tokens over 42
rank-16 adapters on q/k/v/o, 2 threads): 13.8 → 9.7 ms a step in float32, 14.4 → 9.1 with a bfloat16
model. Where the ops cannot be built, `kernel()` raises `KernelUnavailable` saying why, and `auto`
falls back to the plain-torch op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.inference.engine.cpu_kernels import KernelUnavailable, library
from services.inference.engine.lora.ops import SegmentPlan, bags_fit, lora_segment

__all__ = ["KernelUnavailable", "kernel", "lora_cpu"]


def kernel() -> Callable[..., None]:
    """The compiled op, built or loaded on first call; `KernelUnavailable` says why not."""
    op: Callable[..., None] = library().lora_by_token
    return op


def lora_cpu(
    y: torch.Tensor,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    plan: SegmentPlan,
    rank: int | None = None,
) -> None:
    """`ops.lora_segment`'s semantics; a by-token plan over the pool's storage runs compiled. Slots
    in the model's dtype (`lora_dtype=model`) are summed in float32 here and rounded once, where the
    segment op's `embedding_bag`s round the hidden values and the delta to that dtype on the way."""
    bags = plan.bags
    if bags is None or a.dtype not in (torch.float32, y.dtype) or x.dtype != y.dtype or not bags_fit(a, b):
        lora_segment(y, x, a, b, plan, rank)
        return
    kernel()(
        y,
        x if x.stride(-1) == 1 else x.contiguous(),
        a.transpose(1, 2),
        b.transpose(1, 2),
        bags.rows,
        bags.slots,
        bags.scale.view(-1),
        a.shape[1] if rank is None else rank,
    )
