"""One definition of a valid request: what the gateway accepts, the worker serves and attribution
records. Checked on fresh random requests: a request the gateway lets through yields usage records
attribution takes whole, so no request can stop a worker's usage stream."""

from __future__ import annotations

import random
from typing import Any

import pytest
from openlora.v1 import attribution_pb2, common_pb2, inference_pb2

from services.attribution import validation as attribution
from services.common.errors import InvalidArgument
from services.common.request_checks import check_generate_request, check_mix_components
from services.inference.usage.records import RequestUsage, new_usage_id
from services.inference.validation import mix_spec

LIMITS: dict[str, Any] = {"max_records": 10_000, "max_token_index": 1 << 20, "max_future_us": 60_000_000}
ID_ALPHABET = ["a", "b", "job-42", "x" * 128, "x" * 129, "job 42", "tab\there", "é", "", "a\x00"]


def random_request(rng: random.Random) -> inference_pb2.GenerateRequest:
    request = inference_pb2.GenerateRequest(request_id=rng.choice(ID_ALPHABET), tenant="acme")
    request.token_ids.ids.extend([1, 2, 3])
    if rng.random() < 0.5:
        request.adapter_ref.id = rng.choice(ID_ALPHABET)
        request.adapter_ref.version = rng.choice(["", "v1", "v 1"])
        return request
    request.mix.strategy = common_pb2.LINEAR
    for _ in range(rng.randint(0, 4)):
        weight = rng.choice([1.0, 2.5, 1e-3, 1e-7, 3e-7, 0.0, -1.0, float("nan"), 1e30])
        request.mix.components.add(
            adapter=common_pb2.AdapterRef(
                id=rng.choice(["a", "b", "c"]), version=rng.choice(["", "v1", "v2"])
            ),
            weight=weight,
        )
    return request


def records_of(request: inference_pb2.GenerateRequest, usage_id: str) -> attribution_pb2.UsageBatch:
    """The usage records a worker sends for `request`, its adapters resolved to version "v9"."""
    if request.WhichOneof("adapter") == "mix":
        spec = mix_spec(request.mix, "mix")
        components = tuple(
            (adapter_id, version or "v9", share)
            for (adapter_id, version, _), share in zip(spec.components, spec.shares, strict=True)
        )
    else:
        components = ((request.adapter_ref.id, request.adapter_ref.version or "v9", 1.0),)
    usage = RequestUsage(
        usage_id, request.tenant, "worker-1", components, client_request_id=request.request_id
    )
    usage.prompt(3)
    usage.completion(2)
    return attribution_pb2.UsageBatch(sequence=1, worker_id="worker-1", records=usage.take())


def test_what_the_gateway_accepts_attribution_records_whole() -> None:
    rng = random.Random()  # fresh inputs each run; the seed is printed on failure
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    accepted = refused = 0
    for _ in range(2_000):
        request = random_request(rng)
        try:
            check_generate_request(request, require_tenant=True)
        except InvalidArgument:
            refused += 1
            continue
        accepted += 1
        batch = attribution.usage_batch(records_of(request, new_usage_id()), **LIMITS)
        assert batch.refused == [], (seed, request, batch.refused)
        assert sum(r.token_count for r in batch.records) == 5
    assert accepted > 100 and refused > 100, (seed, accepted, refused)


@pytest.mark.parametrize(
    ("weights", "field"),
    [
        ([1.0, 1e-7], "mix[1].weight"),  # a share below the ledger's 1e-6
        ([1.0, 0.0], "mix[1].weight"),
        ([float("nan")], "mix[0].weight"),
    ],
)
def test_mix_weights_the_ledger_cannot_share_are_refused(weights: list[float], field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_mix_components("mix", [(f"a{i}", "", w) for i, w in enumerate(weights)])
    assert caught.value.field == field


def test_shares_are_weights_over_their_total() -> None:
    assert check_mix_components("mix", [("a", "", 1.0), ("b", "", 3.0)]) == [0.25, 0.75]


def test_a_reused_client_id_still_gets_a_usage_id_of_its_own() -> None:
    assert len({new_usage_id() for _ in range(1000)}) == 1000
