from __future__ import annotations

import math
from collections import Counter

import pytest

from services.gateway.routing import WorkerLoad, capacity, rendezvous_order, route

WORKERS = [f"10.0.0.{i}:50052" for i in range(1, 6)]


def idle(addresses: list[str] = WORKERS) -> list[WorkerLoad]:
    return [WorkerLoad(a, 0) for a in addresses]


def test_an_adapter_has_a_stable_first_choice_whatever_the_listing_order() -> None:
    first = route("acme/poet", idle(), 1.25)
    again = route("acme/poet", idle(list(reversed(WORKERS))), 1.25)
    assert first.order == again.order
    assert first.decision == "affinity"
    assert sorted(first.order) == sorted(WORKERS)


def test_adapters_spread_over_the_workers() -> None:
    firsts = Counter(rendezvous_order(f"adapter-{i}", WORKERS)[0] for i in range(1000))
    assert set(firsts) == set(WORKERS)
    assert min(firsts.values()) > 140  # ~200 each


def test_removing_a_worker_moves_only_its_own_adapters() -> None:
    keys = [f"adapter-{i}" for i in range(500)]
    before = {k: rendezvous_order(k, WORKERS)[0] for k in keys}
    gone = WORKERS[2]
    after = {k: rendezvous_order(k, [w for w in WORKERS if w != gone])[0] for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == gone}
    # A worker coming back takes its adapters back: the order is a pure function of the set.
    assert {k: rendezvous_order(k, WORKERS)[0] for k in keys} == before


def test_capacity_is_ceil_of_c_times_the_mean_counting_the_new_request() -> None:
    assert capacity(idle(WORKERS[:3]), 1.25) == 1
    loads = [WorkerLoad("a", 4), WorkerLoad("b", 2), WorkerLoad("c", 2)]
    assert capacity(loads, 1.25) == 4  # ceil(1.25 * 9 / 3) = ceil(3.75)


def test_a_hammered_adapter_spills_to_the_next_workers_in_its_order() -> None:
    order = rendezvous_order("hot", WORKERS[:3])
    in_flight = dict.fromkeys(WORKERS[:3], 0)
    decisions = []
    for step in range(1, 31):
        plan = route("hot", [WorkerLoad(a, n) for a, n in in_flight.items()], 1.25)
        decisions.append(plan.decision)
        in_flight[plan.order[0]] += 1
        # The bound holds at every step: nobody above ceil(c x mean).
        assert max(in_flight.values()) <= math.ceil(1.25 * step / 3)
    assert decisions[0] == "affinity"
    assert "spill" in decisions
    # The adapter's first choice is filled to the bound first, then the next in its order.
    assert in_flight[order[0]] == max(in_flight.values()) == 13
    assert in_flight[order[1]] >= in_flight[order[2]]


def test_a_spilled_request_keeps_the_rest_of_the_hash_order_for_retries() -> None:
    order = rendezvous_order("hot", WORKERS[:3])
    loads = [WorkerLoad(order[0], 5), WorkerLoad(order[1], 0), WorkerLoad(order[2], 0)]
    plan = route("hot", loads, 1.25)
    assert plan.decision == "spill"
    assert plan.order == [order[1], order[0], order[2]]


def test_the_base_model_goes_to_the_least_loaded() -> None:
    loads = [WorkerLoad("a", 3), WorkerLoad("b", 1), WorkerLoad("c", 2)]
    plan = route(None, loads, 1.25)
    assert plan.decision == "least_loaded"
    assert plan.order == ["b", "c", "a"]


def test_idle_workers_share_base_model_traffic() -> None:
    firsts = Counter(route(None, idle(WORKERS[:3]), 1.25).order[0] for _ in range(300))
    assert len(firsts) == 3


def test_no_workers_is_an_error() -> None:
    with pytest.raises(ValueError):
        route("x", [], 1.25)


def test_requests_are_routed_by_adapter_or_by_a_mix_first_component() -> None:
    from openlora.v1 import common_pb2, inference_pb2

    from services.gateway.relay import routing_key

    single = inference_pb2.GenerateRequest(adapter_ref=common_pb2.AdapterRef(id="acme/poet", version="v1"))
    mix = inference_pb2.GenerateRequest()
    for adapter_id in ("acme/poet", "shared/rhyme"):
        mix.mix.components.add(adapter=common_pb2.AdapterRef(id=adapter_id), weight=0.5)
    assert routing_key(single) == routing_key(mix) == "acme/poet"  # versions share the adapter's workers
    assert routing_key(inference_pb2.GenerateRequest(text="hi")) is None
