"""One definition of a valid request, used by the gateway, the worker and attribution.

What the gateway lets through reaches the worker, and what the worker serves it reports to
attribution: if a later service refused what an earlier one accepted, one request would stop a
worker's usage stream. So request ids, tenants and mixes are checked here, the same way everywhere,
and a mix's weights are normalised here into the shares the ledger stores (integers of 1e-6 that sum
to exactly 1e6), so a share the ledger cannot represent is refused before anything is generated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from openlora.v1 import inference_pb2

from services.common.errors import InvalidArgument

MAX_ID_CHARS = 128
MAX_ADAPTER_ID_CHARS = 256
MICROS_PER_UNIT = 10**6  # weights and shares: 1 = 1e6 micros
# A sum of shares this close to 1 is a rounding artefact of floating point and is corrected exactly;
# anything further off is a bug in the sender.
SUM_TOLERANCE_MICROS = 10
MAX_MIX_COMPONENTS = 16

_WHITESPACE = re.compile(r"\s")

Component = tuple[str, str, float]  # adapter id, version ("" = latest), weight


def check_id(field: str, value: str, *, max_chars: int = MAX_ID_CHARS, required: bool = True) -> str:
    """An identifier the ledger can store as given: printable, no whitespace, bounded."""
    if not value:
        if required:
            raise InvalidArgument(field, "must not be empty")
        return value
    if len(value) > max_chars:
        raise InvalidArgument(field, f"longer than {max_chars} characters")
    if not value.isprintable() or _WHITESPACE.search(value):
        raise InvalidArgument(field, "must not contain whitespace or control characters")
    return value


def is_valid_id(value: str) -> bool:
    try:
        check_id("", value)
    except InvalidArgument:
        return False
    return True


def check_request_id(field: str, value: str) -> str:
    """A client's request id; empty means "assign one"."""
    return check_id(field, value, required=False)


def check_tenant(field: str, value: str) -> str:
    """Every served request is billed to a tenant (the gateway stamps it from the caller's key)."""
    return check_id(field, value)


def check_adapter_ref(field: str, adapter_id: str, version: str) -> None:
    """A single adapter named by a request (`{field}.id`, `{field}.version`; empty = latest)."""
    check_id(f"{field}.id", adapter_id, max_chars=MAX_ADAPTER_ID_CHARS)
    check_id(f"{field}.version", version, required=False)


def check_generate_request(request: inference_pb2.GenerateRequest, *, require_tenant: bool) -> None:
    """What every service checks of a `Generate` request: its ids and its adapter or mix. (The
    gateway stamps the tenant itself, so only a worker requires one in the request.)"""
    check_request_id("request_id", request.request_id)
    if require_tenant:
        check_tenant("tenant", request.tenant)
    kind = request.WhichOneof("adapter")
    if kind == "adapter_ref":
        check_adapter_ref("adapter_ref", request.adapter_ref.id, request.adapter_ref.version)
    elif kind == "mix":
        components = [(c.adapter.id, c.adapter.version, c.weight) for c in request.mix.components]
        check_mix_components("mix.components", components)


def to_micros_summing_to_one(field: str, name: str, values: Sequence[float]) -> list[int]:
    """Fractions `{field}[i].{name}` (each in (0, 1]) as micros summing to exactly 1e6; the largest
    absorbs the rounding."""
    micros = []
    for i, value in enumerate(values):
        if not math.isfinite(value) or value <= 0 or value > 1:
            raise InvalidArgument(f"{field}[{i}].{name}", f"must be in (0, 1], got {value!r}")
        micros.append(round(value * MICROS_PER_UNIT))
        if micros[-1] == 0:
            raise InvalidArgument(f"{field}[{i}].{name}", f"below the resolution of 1e-6, got {value!r}")
    error = MICROS_PER_UNIT - sum(micros)
    if abs(error) > SUM_TOLERANCE_MICROS:
        raise InvalidArgument(f"{field}.{name}", f"must sum to 1, got {sum(values)!r}")
    micros[max(range(len(micros)), key=micros.__getitem__)] += error
    return micros


def check_mix_adapters(field: str, components: Sequence[Component]) -> None:
    """Check a mix's `(id, version, weight)` components (`{field}[i]`), weights not normalised.

    One adapter may appear twice only under two explicit versions: "a" (latest) and "a@v" may be the
    same version, which would credit one adapter twice for one token.
    """
    if not components:
        raise InvalidArgument(field, "a mix needs at least one component")
    if len(components) > MAX_MIX_COMPONENTS:
        raise InvalidArgument(field, f"at most {MAX_MIX_COMPONENTS} components per mix")
    versions_of: dict[str, list[tuple[int, str]]] = {}
    for i, (adapter_id, version, weight) in enumerate(components):
        where = f"{field}[{i}]"
        check_adapter_ref(f"{where}.adapter", adapter_id, version)
        for j, other in versions_of.get(adapter_id, ()):
            if not version or not other or version == other:
                raise InvalidArgument(
                    f"{where}.adapter",
                    f"{adapter_id!r} is already in the mix as {field}[{j}]; "
                    "name one adapter twice only under two explicit versions",
                )
        versions_of.setdefault(adapter_id, []).append((i, version))
        if not math.isfinite(weight) or weight <= 0:
            raise InvalidArgument(f"{where}.weight", f"must be a positive finite number, got {weight}")


def check_mix_components(field: str, components: Sequence[Component]) -> list[float]:
    """Check a requested mix and return each component's share (weight ÷ total), which is what
    usage credits: every share must be representable in the ledger."""
    check_mix_adapters(field, components)
    total = math.fsum(weight for _, _, weight in components)  # finite: wire weights are float32
    shares = [weight / total for _, _, weight in components]
    for i, share in enumerate(shares):
        if round(share * MICROS_PER_UNIT) == 0:
            raise InvalidArgument(
                f"{field}[{i}].weight",
                f"its share of the mix ({share:.3g}) is below the usage ledger's resolution of 1e-6",
            )
    to_micros_summing_to_one(field, "weight", shares)
    return shares
