"""Service tokens, the role table and the authorizer, without a server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from openlora.v1 import inference_pb2

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.settings import ServiceSettings
from services.common.trust.caller import ServiceAuthorizer
from services.common.trust.roles import AUTHORIZATION, OPERATOR, WORKER, Role, allowed_roles, is_open
from services.common.trust.setup import NoServiceAuth, ensure_secret_file, server_authorizer
from services.common.trust.tokens import (
    TOKEN_METADATA_KEY,
    TokenMinter,
    TokenVerifier,
    load_secret,
    new_secret,
)

SECRET = b"s" * 40


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_token_carries_its_role_to_its_audience() -> None:
    token = TokenMinter(SECRET, Role.GATEWAY).token("worker")
    assert TokenVerifier(SECRET, "worker").role(token) is Role.GATEWAY


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.replace("gateway", "operator"), "signature"),
        (lambda t: t[:-2] + ("00" if t[-2:] != "00" else "11"), "signature"),
        (lambda t: "garbage", "malformed"),
        (lambda t: "olst2" + t[5:], "malformed"),
        (lambda t: t.replace(".", "", 1), "malformed"),
    ],
)
def test_a_changed_token_is_refused(mutate: Any, message: str) -> None:
    token = mutate(TokenMinter(SECRET, Role.GATEWAY).token("worker"))
    with pytest.raises(Unauthenticated, match=message):
        TokenVerifier(SECRET, "worker").role(token)


def test_another_clusters_secret_does_not_verify() -> None:
    token = TokenMinter(b"x" * 40, Role.OPERATOR).token("store")
    with pytest.raises(Unauthenticated, match="signature"):
        TokenVerifier(SECRET, "store").role(token)


def test_a_token_for_one_component_is_refused_by_another() -> None:
    token = TokenMinter(SECRET, Role.WORKER).token("attribution")
    with pytest.raises(Unauthenticated, match="for 'attribution', not 'store'"):
        TokenVerifier(SECRET, "store").role(token)


def test_tokens_expire_and_are_renewed_before_they_do() -> None:
    clock = Clock()
    minter = TokenMinter(SECRET, Role.WORKER, lifetime_s=300, clock=clock)
    verifier = TokenVerifier(SECRET, "store", clock=clock)
    first = minter.token("store")
    assert minter.token("store") == first  # cached
    clock.now += 160  # past half its life: the next call gets a fresh one
    second = minter.token("store")
    assert second != first
    clock.now += 300 + 31 - 160  # the first is now past expiry and the skew allowance
    with pytest.raises(Unauthenticated, match="expired"):
        verifier.role(first)
    assert verifier.role(second) is Role.WORKER


def test_a_token_living_longer_than_allowed_is_refused() -> None:
    token = TokenMinter(SECRET, Role.OPERATOR, lifetime_s=3600).token("store")
    with pytest.raises(Unauthenticated, match="lives past"):
        TokenVerifier(SECRET, "store").role(token)


def test_secret_files_are_checked_and_made_owner_only(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too short\n")
    with pytest.raises(ValueError, match="at least 32"):
        load_secret(short)
    made = ensure_secret_file(tmp_path / "deep" / "secret")
    assert made.stat().st_mode & 0o777 == 0o600
    assert load_secret(made) == made.read_bytes().strip()
    assert ensure_secret_file(made).read_bytes() == made.read_bytes()  # kept, not replaced
    with pytest.raises(ValueError, match="at least 32"):
        ensure_secret_file(short)  # never silently replaced either
    assert len(new_secret()) >= 32


def test_every_rpc_of_every_service_authenticated_component_is_in_the_table() -> None:
    from openlora.v1 import adapter_store_pb2, attribution_pb2, relay_pb2

    served = {
        "worker": [
            inference_pb2.DESCRIPTOR.services_by_name["Inference"],
            relay_pb2.DESCRIPTOR.services_by_name["WorkerRelay"],
        ],
        "store": [adapter_store_pb2.DESCRIPTOR.services_by_name["AdapterStore"]],
        "attribution": [attribution_pb2.DESCRIPTOR.services_by_name["Attribution"]],
    }
    for component, services in served.items():
        methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
        assert methods == set(AUTHORIZATION[component]), component
        assert all(AUTHORIZATION[component][m] for m in methods), f"{component}: an RPC nobody may call"


def test_unlisted_methods_are_nobodys() -> None:
    assert allowed_roles("store", "/openlora.v1.AdapterStore/Purge") == frozenset()
    assert is_open("/grpc.health.v1.Health/Check") and is_open("/grpc.reflection.v1alpha.X/Y")
    assert not is_open("/openlora.v1.AdapterStore/Get")


class FakeContext:
    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), common_name: bytes | None = None):
        self.metadata = metadata
        self.common_name = common_name

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [self.common_name]} if self.common_name else {}


def test_the_authorizer_answers_unauthenticated_or_permission_denied() -> None:
    authorizer = ServiceAuthorizer("store", TokenVerifier(SECRET, "store"), certificates=True)
    register = "/openlora.v1.AdapterStore/RegisterBaseModel"
    with pytest.raises(Unauthenticated, match="client certificate or a service token"):
        authorizer.authorize(register, FakeContext())
    worker = ((TOKEN_METADATA_KEY, TokenMinter(SECRET, WORKER).token("store")),)
    with pytest.raises(PermissionDenied, match=r"'worker' may not call .*only operator"):
        authorizer.authorize(register, FakeContext(worker))
    operator = ((TOKEN_METADATA_KEY, TokenMinter(SECRET, OPERATOR).token("store")),)
    assert authorizer.authorize(register, FakeContext(operator)) is OPERATOR
    # A verified certificate names the role; it wins over a token.
    assert authorizer.authorize(register, FakeContext(worker, common_name=b"operator")) is OPERATOR
    with pytest.raises(PermissionDenied, match="common name 'bob' is not a role"):
        authorizer.authorize(register, FakeContext(common_name=b"bob"))


def test_a_service_with_no_way_to_authenticate_refuses_to_start(tmp_path: Path) -> None:
    settings = ServiceSettings.model_construct(
        service_secret_file=None, tls_client_ca_file=None, open_rpcs=False
    )
    with pytest.raises(NoServiceAuth, match="SERVICE_SECRET_FILE"):
        server_authorizer(settings, "store")
    assert server_authorizer(settings, "gateway") is None  # API keys, not service roles
    opened = ServiceSettings.model_construct(
        service_secret_file=None, tls_client_ca_file=None, open_rpcs=True
    )
    assert server_authorizer(opened, "store") is None
    secret = ensure_secret_file(tmp_path / "secret")
    closed = ServiceSettings.model_construct(
        service_secret_file=secret, tls_client_ca_file=None, open_rpcs=False
    )
    authorizer = server_authorizer(closed, "attribution")
    assert authorizer is not None and authorizer.verifier is not None and not authorizer.certificates


def test_the_readme_table_is_the_code_table() -> None:
    """The README's "Who may call what" lists every RPC with exactly the roles the code allows."""
    import re

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    section = readme.split("### Who may call what", 1)[1].split("\n#", 1)[0]
    services = {"worker": "worker", "store": "store", "attribution": "attribution"}
    documented: dict[tuple[str, str], set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] not in services:
            continue
        for rpc in re.findall(r"`([A-Za-z/]+)`", cells[1]):
            documented[(cells[0], rpc.rsplit("/", 1)[-1])] = {r.strip() for r in cells[2].split(",")}
    in_code = {
        (component, method.rsplit("/", 1)[-1]): {r.value for r in roles}
        for component, methods in AUTHORIZATION.items()
        for method, roles in methods.items()
    }
    assert documented == in_code
