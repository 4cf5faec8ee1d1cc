"""Per-request adapter mixes, defined on the weight deltas dW_i = s_i * B_i @ A_i (never on A and B apart).

LINEAR is exactly sum_i w_i * dW_i without forming dW: stacking the scaled A's and the B's along the rank
gives B_cat @ A_cat = sum_i B_i @ (w_i * s_i * A_i), at rank sum_i r_i and scaling 1.

TIES, DARE_LINEAR and DARE_TIES form each module's dW_i, merge them, and re-factor the merge by truncated
SVD to the requested rank (B' = U_r * S_r, A' = Vh_r, scaling 1). The SVD keeps the best rank-r
approximation of the merge in Frobenius norm; the part it drops is the approximation of a mix:
  - TIES: keep each delta's `density` largest-magnitude entries, elect each entry's sign from the sum of
    the trimmed deltas, average (with weights) the entries that agree with it;
  - DARE_LINEAR: keep each entry with probability `density` and rescale by 1/density, then weighted sum;
  - DARE_TIES: the DARE drop followed by TIES' sign election and disjoint mean.
DARE's drop draws from a generator seeded by the mix's `seed`, module by module in a fixed order, so a
mix is deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Pairs = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, d_in], B [d_out, r])
Strategy = Literal["LINEAR", "TIES", "DARE_LINEAR", "DARE_TIES"]


@dataclass(frozen=True)
class Component:
    pairs: Pairs
    rank: int
    scaling: float  # alpha / r
    weight: float


@dataclass(frozen=True)
class MixedAdapter:
    pairs: Pairs
    rank: int  # the largest rank of any module (the slot's rank)
    scaling: float


def _module_paths(components: Sequence[Component]) -> list[str]:
    """Every module any component adapts, in a fixed order (so DARE's random draws are reproducible)."""
    return sorted({path for c in components for path in c.pairs})


def linear_mix(components: Sequence[Component]) -> MixedAdapter:
    pairs: Pairs = {}
    for path in _module_paths(components):
        present = [c for c in components if path in c.pairs]
        a = torch.cat([c.pairs[path][0].float() * (c.weight * c.scaling) for c in present], dim=0)
        b = torch.cat([c.pairs[path][1].float() for c in present], dim=1)
        pairs[path] = (a, b)
    return MixedAdapter(pairs, max(a.shape[0] for a, _ in pairs.values()), 1.0)


def _trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return delta
    keep = int(density * delta.numel())
    flat = delta.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[flat.abs().topk(keep).indices] = 1
    return delta * mask.view_as(delta)


def _drop(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return delta
    kept = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * kept / density


def _elect_and_average(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """stack [n, d_out, d_in], weights [n]: weighted sum over the entries agreeing with the elected sign,
    divided by how many agree."""
    elected = torch.where(stack.sum(dim=0) >= 0, 1.0, -1.0)
    agree = stack.sign() == elected
    total = (stack * weights.view(-1, 1, 1) * agree).sum(dim=0)
    return total / agree.sum(dim=0).clamp(min=1)


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    strategy: Strategy,
    density: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """One module's merged delta from the components' deltas [d_out, d_in]."""
    w = torch.tensor(list(weights), dtype=torch.float32)
    if strategy == "TIES":
        return _elect_and_average(torch.stack([_trim(d, density) for d in deltas]), w)
    dropped = torch.stack([_drop(d, density, generator) for d in deltas])
    if strategy == "DARE_LINEAR":
        return (dropped * w.view(-1, 1, 1)).sum(dim=0)
    if strategy == "DARE_TIES":
        return _elect_and_average(dropped, w)
    raise ValueError(f"{strategy} is not a materialising merge strategy")


def svd_mix(
    components: Sequence[Component], strategy: Strategy, density: float, rank: int, seed: int
) -> MixedAdapter:
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rank = rank or max(c.rank for c in components)
    generator = torch.Generator().manual_seed(seed)
    pairs: Pairs = {}
    for path in _module_paths(components):
        present = [c for c in components if path in c.pairs]
        deltas = [c.scaling * (c.pairs[path][1].float() @ c.pairs[path][0].float()) for c in present]
        merged = merge_deltas(deltas, [c.weight for c in present], strategy, density, generator)
        u, s, vh = torch.linalg.svd(merged, full_matrices=False)
        r = min(rank, s.shape[0])
        pairs[path] = (vh[:r].contiguous(), (u[:, :r] * s[:r]).contiguous())
    return MixedAdapter(pairs, rank, 1.0)


def mix(
    components: Sequence[Component], strategy: Strategy, *, density: float = 1.0, rank: int = 0, seed: int = 0
) -> MixedAdapter:
    if not components:
        raise ValueError("a mix needs at least one component")
    if strategy == "LINEAR":
        return linear_mix(components)
    return svd_mix(components, strategy, density, rank, seed)
