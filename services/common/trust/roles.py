"""Service roles and the one table that says which role may call which RPC.

The table is the whole policy: the server kit refuses any method of a service-authenticated
component that is not listed (so an RPC added to a proto is closed until someone decides who may
call it), and the test matrix is generated from it. Health and reflection stay open so probes and
tools work without credentials. The gateway is not listed: its public API is authenticated by
tenant API keys, and it only ever calls the others.
"""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    GATEWAY = "gateway"
    WORKER = "worker"
    ATTRIBUTION = "attribution"
    OPERATOR = "operator"


GATEWAY, WORKER, ATTRIBUTION, OPERATOR = Role.GATEWAY, Role.WORKER, Role.ATTRIBUTION, Role.OPERATOR

# Methods served to any caller, credential or not.
OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

_INFERENCE = "/openlora.v1.Inference/"
_RELAY = "/openlora.v1.WorkerRelay/"
_STORE = "/openlora.v1.AdapterStore/"
_ATTRIBUTION = "/openlora.v1.Attribution/"

#: component (the server being called) → full method name → the roles that may call it.
AUTHORIZATION: dict[str, dict[str, frozenset[Role]]] = {
    "worker": {
        # A tenant named in the request is believed only from the gateway; an operator's direct call
        # is billed to the worker's default tenant (single-tenant setups without a gateway).
        _INFERENCE + "Generate": frozenset({GATEWAY, OPERATOR}),
        _INFERENCE + "ListModels": frozenset({GATEWAY, OPERATOR}),
        _RELAY + "Relay": frozenset({GATEWAY}),
    },
    "store": {
        # The tenant-facing calls come through the gateway, which enforces ownership and visibility.
        _STORE + "Upload": frozenset({GATEWAY, OPERATOR}),
        _STORE + "Import": frozenset({GATEWAY, WORKER, OPERATOR}),
        _STORE + "Get": frozenset({GATEWAY, WORKER, ATTRIBUTION, OPERATOR}),
        _STORE + "List": frozenset({GATEWAY, OPERATOR}),
        _STORE + "Delete": frozenset({GATEWAY, OPERATOR}),
        _STORE + "Download": frozenset({GATEWAY, WORKER, OPERATOR}),
        _STORE + "RegisterBaseModel": frozenset({OPERATOR}),
        _STORE + "ListBaseModels": frozenset({GATEWAY, OPERATOR}),
    },
    "attribution": {
        _ATTRIBUTION + "RecordUsage": frozenset({WORKER}),
        _ATTRIBUTION + "StreamUsage": frozenset({WORKER}),
        _ATTRIBUTION + "GetUsage": frozenset({OPERATOR}),
        _ATTRIBUTION + "GetRewards": frozenset({OPERATOR}),
        _ATTRIBUTION + "WatchRewards": frozenset({OPERATOR}),
        # Provenance decides who is paid: only an operator may state it; otherwise it comes from the store.
        _ATTRIBUTION + "RegisterProvenance": frozenset({OPERATOR}),
        _ATTRIBUTION + "SetPrice": frozenset({OPERATOR}),
    },
}

#: The role each service presents when it calls another.
ROLE_OF_COMPONENT: dict[str, Role] = {"gateway": GATEWAY, "worker": WORKER, "attribution": ATTRIBUTION}


def is_open(method: str) -> bool:
    return method.startswith(OPEN_PREFIXES)


def allowed_roles(component: str, method: str) -> frozenset[Role]:
    """The roles that may call `method` on `component`; empty (nobody) for a method not in the table."""
    return AUTHORIZATION[component].get(method, frozenset())
