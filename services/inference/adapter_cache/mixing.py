"""Per-request mixes (`AdapterMix`) as derived adapters the engine serves like any other.

A mix is named by the hash of what determines its weights: the components' resolved versions and
weights, the strategy, density, rank and seed. The derived adapter is built once (from the
components in host RAM, see `lora.mixes`) and kept in the host tier under that name, so every later
request for the same mix is a host hit, and a new version of a component is a new mix.

Usage of a mixed request is credited to the components in proportion to their weights: weights must
be positive and finite (a negative weight would credit a negative share of a token), and each share
representable in the ledger (checked, as by the gateway and attribution, in `request_checks`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass

from services.inference.adapter_cache.loaded import LoadedAdapter
from services.inference.engine.lora.mixes import Component, Strategy, mix

MIX_ID = "~mix"  # never a stored adapter id (ids start with [a-z0-9]), so a derived key cannot collide


@dataclass(frozen=True)
class MixSpec:
    """A checked per-request mix (`validation.mix_spec` makes one from the wire's `AdapterMix`)."""

    components: tuple[tuple[str, str, float], ...]  # (adapter id, version or "" for latest, weight)
    strategy: Strategy
    density: float  # in (0, 1]; 1 for LINEAR
    rank: int  # 0 = the largest component rank (TIES/DARE); unused by LINEAR
    seed: int
    shares: tuple[float, ...]  # each component's weight ÷ the total: what its usage is credited

    def output_rank(self, component_ranks: Sequence[int]) -> int:
        """Rank of the derived adapter: LINEAR concatenates ranks, the others re-factor to `rank`."""
        if self.strategy == "LINEAR":
            return sum(component_ranks)
        return self.rank or max(component_ranks)


def mix_version(spec: MixSpec, resolved: Sequence[LoadedAdapter]) -> str:
    """The derived adapter's version: a hash over everything its weights depend on."""
    canonical = {
        "components": [
            [a.id, a.version, a.digest, w] for a, (_, _, w) in zip(resolved, spec.components, strict=True)
        ],
        "strategy": spec.strategy,
        "density": spec.density if spec.strategy != "LINEAR" else 1.0,
        "rank": spec.output_rank([a.rank for a in resolved]),
        "seed": spec.seed if spec.strategy.startswith("DARE") else 0,
    }
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def build_mixed_adapter(spec: MixSpec, resolved: Sequence[LoadedAdapter], version: str) -> LoadedAdapter:
    """Form the derived adapter (blocking: SVD for TIES/DARE; call off the event loop)."""
    parts = [
        Component(adapter.weights, adapter.rank, adapter.scaling, weight)
        for adapter, (_, _, weight) in zip(resolved, spec.components, strict=True)
    ]
    mixed = mix(parts, spec.strategy, density=spec.density, rank=spec.rank, seed=spec.seed)
    weights = {path: (a.contiguous(), b.contiguous()) for path, (a, b) in mixed.pairs.items()}
    credits = tuple((a.id, a.version, share) for a, share in zip(resolved, spec.shares, strict=True))
    return LoadedAdapter(
        id=MIX_ID,
        version=version,
        digest=version,
        rank=mixed.rank,
        alpha=mixed.scaling * mixed.rank,
        target_modules=tuple(sorted({path.rsplit(".", 1)[-1] for path in weights})),
        weights=weights,
        size_bytes=sum(a.nbytes + b.nbytes for a, b in weights.values()),
        mix_of=credits,
    )
