"""Which worker serves a request: rendezvous hashing with bounded load, least-loaded for the base model.

Rendezvous (highest-random-weight) hashing ranks the workers by hash(adapter id, worker) so each
adapter has a stable preference order and stays hot on few workers; adding or removing a worker moves
only the adapters whose first choice it was. Bounded load (Mirrokni, Thorup, Zadimoghaddam 2018):
a worker is skipped while taking one more request would put it above ceil(c x mean in-flight), with
the new request counted in the mean — so a hammered adapter spills onto the next workers in its order
instead of queueing on one. Plain Python over names and ints.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Decision = Literal["affinity", "spill", "least_loaded"]


@dataclass(frozen=True)
class WorkerLoad:
    address: str
    in_flight: int


@dataclass(frozen=True)
class Route:
    order: list[str]  # the worker to try first, then the fallbacks for retries
    decision: Decision


def _score(key: str, address: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{address}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, addresses: Sequence[str]) -> list[str]:
    """The workers in `key`'s preference order (highest score first)."""
    return sorted(addresses, key=lambda address: _score(key, address), reverse=True)


def capacity(loads: Sequence[WorkerLoad], load_factor: float) -> int:
    """Most requests a worker may hold, the new one included: ceil(c x mean), at least 1."""
    total = sum(w.in_flight for w in loads) + 1
    return max(1, math.ceil(load_factor * total / len(loads)))


def route(key: str | None, loads: Sequence[WorkerLoad], load_factor: float) -> Route:
    """Where to send a request for adapter `key` (None: the base model). `loads` must not be empty."""
    if not loads:
        raise ValueError("no workers to route to")
    if key is None:
        # Random tie-break: idle workers share base-model traffic instead of the first taking it all.
        ranked = sorted(loads, key=lambda w: (w.in_flight, random.random()))
        return Route([w.address for w in ranked], "least_loaded")
    in_flight = {w.address: w.in_flight for w in loads}
    order = rendezvous_order(key, list(in_flight))
    limit = capacity(loads, load_factor)
    # Some worker always fits: if none did, every load would be >= limit >= c x mean > mean.
    chosen = next(a for a in order if in_flight[a] + 1 <= limit)
    if chosen == order[0]:
        return Route(order, "affinity")
    return Route([chosen, *(a for a in order if a != chosen)], "spill")
