"""The adapter slot pool: per target module, stacked device buffers written in place.

For every wrapped linear module, `A[n_slots, r_max, d_in]` and `B[n_slots, d_out, r_max]` are
allocated once at start-up. For the plain-torch and cpu ops they are transposed views of
`[n_slots, d_in, r_max]` and `[n_slots, r_max, d_out]` storage: each slot is then a run of whole rows of
Aᵀ and of B, which the ops read in place by token (`ops.TokenBags`, `cpu_kernel`), and B's expand
multiplies by that contiguous form, about twice as fast on CPU. The triton kernels read the rank as the
innermost axis of both. Loading an adapter copies its matrices into one slot, zero-padded to `r_max`; a
slot is zeroed wherever the new adapter has no weights, so nothing of the previous occupant survives.
Per-slot rank and scaling (alpha / r) travel as host lists, read by the segment op. Each step also
gives every module the most rank its step's adapters hold there (`module_ranks`): a module none of them
touches is skipped, and the others read no more rank dims than that, so slots allocated at the worker's
default rank and modules cost what the adapters themselves hold.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from services.inference.engine.lora.ops import LoRAOp, SegmentPlan, bags_fit, lora_segment, plan_segments
from services.inference.engine.lora.slots import EMPTY, SlotTable

log = logging.getLogger(__name__)

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AdapterWeights = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, d_in], B [d_out, r])


@dataclass
class LoRAStep:
    """Per-step segments over the T tokens of the flattened batch."""

    seg_indptr: list[int]  # num_segments + 1: segment s covers tokens [seg_indptr[s], seg_indptr[s + 1])
    seg_slots: list[int]  # num_segments: slot of each segment, EMPTY for the base model
    plan: SegmentPlan | None = None  # set by LoRAPool.step for the duration of the forward pass
    module_ranks: list[int] | None = None  # set with the plan: per wrapped module, the most rank dims
    # any of the step's slots holds there (0: no adapter of the step touches it)

    @property
    def uses_adapters(self) -> bool:
        return any(k != EMPTY for k in self.seg_slots)


class MultiLoRALinear(nn.Module):
    """A base `nn.Linear` plus, per token, the delta of that token's adapter slot."""

    def __init__(
        self, base: nn.Linear, pool: LoRAPool, index: int, r_max: int, n_slots: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.base = base
        self.pool = pool
        self.index = index  # in the pool's modules
        device = base.weight.device
        if pool.op_name in ("segment", "cpu"):
            a = torch.zeros(n_slots, base.in_features, r_max, dtype=dtype, device=device).transpose(1, 2)
            b = torch.zeros(n_slots, r_max, base.out_features, dtype=dtype, device=device).transpose(1, 2)
        else:
            a = torch.zeros(n_slots, r_max, base.in_features, dtype=dtype, device=device)
            b = torch.zeros(n_slots, base.out_features, r_max, dtype=dtype, device=device)
        self.lora_a = nn.Buffer(a)
        self.lora_b = nn.Buffer(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        step = self.pool.current
        if step is None or not step.uses_adapters:
            return y
        assert step.plan is not None and step.module_ranks is not None
        rank = step.module_ranks[self.index]
        if rank == 0:  # none of the step's adapters has weights here: reading their zeros adds nothing
            return y
        self.pool.op(
            y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), self.lora_a, self.lora_b, step.plan, rank
        )
        return y


class LoRAPool:
    def __init__(
        self,
        model: nn.Module,
        *,
        num_slots: int,
        r_max: int,
        target_modules: tuple[str, ...] = DEFAULT_TARGETS,
        dtype: torch.dtype = torch.float32,
        op: str = "auto",
    ) -> None:
        """`op`: "segment" (plain torch, any device), "cpu" (compiled, CPU), "triton" (CUDA) or "auto"
        (triton on CUDA when it imports, else segment; cpu on CPU where it builds, else segment)."""
        if r_max < 1:
            raise ValueError("r_max must be >= 1")
        device = next(model.parameters()).device
        self.op_name, self.op = resolve_op(op, device)
        self.num_slots = num_slots
        self.r_max = r_max
        self.dtype = dtype
        self.table = SlotTable(num_slots)
        self.ranks = [0] * num_slots
        self.scaling = [0.0] * num_slots
        self.current: LoRAStep | None = None
        self.layers: dict[str, MultiLoRALinear] = {}
        targets = set(target_modules)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                parent_name, _, child = name.rpartition(".")
                wrapped = MultiLoRALinear(module, self, len(self.layers), r_max, num_slots, dtype)
                setattr(model.get_submodule(parent_name), child, wrapped)
                self.layers[name] = wrapped
        if not self.layers:
            raise ValueError(f"the model has no linear module named any of {sorted(targets)}")
        # Per module and slot, the rank its adapter holds there: adapters that leave a module out (or
        # give it a smaller rank) cost nothing there in the steps they alone serve.
        self.module_ranks = torch.zeros(len(self.layers), num_slots, dtype=torch.int32)

    @property
    def target_modules(self) -> set[str]:
        return {name.rsplit(".", 1)[-1] for name in self.layers}

    @contextmanager
    def step(self, step: LoRAStep) -> Iterator[None]:
        """Make `step` the segments every wrapped layer reads during one forward pass."""
        if step.uses_adapters:
            layer = next(iter(self.layers.values()))  # follows the model if it moved
            layout: Literal["by-token", "auto"] = (
                "by-token" if bags_fit(layer.lora_a, layer.lora_b) else "auto"
            )
            step.plan = plan_segments(
                step.seg_indptr, step.seg_slots, self.scaling, self.ranks, layer.lora_a.device, layout
            )
            used = sorted({k for k in step.seg_slots if k != EMPTY})
            step.module_ranks = self.module_ranks[:, used].amax(dim=1).tolist()
        self.current = step
        try:
            yield
        finally:
            self.current = None

    def check(self, weights: AdapterWeights, rank: int) -> None:
        """Raise ValueError if the adapter cannot be served by this pool."""
        if rank > self.r_max:
            raise ValueError(f"rank {rank} exceeds this worker's maximum LoRA rank {self.r_max}")
        unknown = sorted(set(weights) - set(self.layers))
        if unknown:
            raise ValueError(f"adapter targets modules this worker does not serve: {', '.join(unknown[:4])}")
        if self.dtype == torch.float16:  # bf16 spans fp32's range; fp16 stops at 65504 and would hold inf
            largest = max((float(t.abs().max()) for pair in weights.values() for t in pair), default=0.0)
            if largest > torch.finfo(torch.float16).max:
                raise ValueError(
                    f"adapter weights reach {largest:.3g}, past float16's range: "
                    "this worker's slots need lora_dtype=float32 to serve it"
                )

    @torch.no_grad()
    def load(self, key: Hashable, weights: AdapterWeights, rank: int, scaling: float) -> int:
        """Put the adapter in a slot (reusing its slot if resident); return the slot."""
        self.check(weights, rank)
        acquired = self.table.acquire(key)
        slot = acquired.slot
        if not acquired.needs_load:
            return slot
        for name, layer in self.layers.items():
            pair = weights.get(name)
            if pair is None:
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                self.module_ranks[layer.index, slot] = 0
                continue
            a, b = pair
            r = a.shape[0]
            self.module_ranks[layer.index, slot] = r
            layer.lora_a[slot, :r].copy_(a)
            layer.lora_a[slot, r:].zero_()
            layer.lora_b[slot, :, :r].copy_(b)
            layer.lora_b[slot, :, r:].zero_()
        self.ranks[slot] = rank
        self.scaling[slot] = scaling
        return slot

    @torch.no_grad()
    def unload(self, key: Hashable) -> None:
        slot = self.table.release(key)
        for layer in self.layers.values():
            layer.lora_a[slot].zero_()
            layer.lora_b[slot].zero_()
        self.module_ranks[:, slot] = 0
        self.ranks[slot] = 0
        self.scaling[slot] = 0.0


def resolve_op(name: str, device: torch.device) -> tuple[str, LoRAOp]:
    if name not in ("auto", "segment", "cpu", "triton"):
        raise ValueError(f"unknown LoRA op {name!r}: use auto, segment, cpu or triton")
    if name == "segment":
        return "segment", lora_segment
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        return _cpu_op(explicit=name == "cpu", device=device)
    if name == "auto" and device.type != "cuda":
        return "segment", lora_segment
    try:
        from services.inference.engine.lora.triton_ops import lora_bgmv
    except ImportError as exc:
        if name == "triton":
            raise ValueError(f"the triton LoRA op needs the triton package: {exc}") from None
        return "segment", lora_segment
    if device.type != "cuda" and not os.environ.get("TRITON_INTERPRET"):
        raise ValueError("the triton LoRA op runs on CUDA (or on CPU under TRITON_INTERPRET=1)")
    return "triton", lora_bgmv


def _cpu_op(explicit: bool, device: torch.device) -> tuple[str, LoRAOp]:
    from services.inference.engine.lora.cpu_kernel import KernelUnavailable, kernel, lora_cpu

    if device.type != "cpu":
        raise ValueError(f"the cpu LoRA op runs on CPU, not {device}")
    try:
        kernel()
    except KernelUnavailable as exc:
        if explicit:
            raise ValueError(str(exc)) from None
        log.warning("%s; using the plain-torch segment op", exc)
        return "segment", lora_segment
    return "cpu", lora_cpu
