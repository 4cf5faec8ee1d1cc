"""Every RPC of every service, called with no credential, with each role's and with a stranger's.

The cells come from `roles.AUTHORIZATION`: an RPC added to a proto and to the table is called here
without anyone writing a test for it (and one left out of the table fails `test_trust`). Real store,
attribution and worker servers, in both modes: service tokens over plaintext, and mutual TLS with a
throwaway CA where the client certificate's common name is the role.

A role the table allows gets the handler's own answer to an empty request (`HANDLER_ANSWERS`), so
the cell proves the call got past the check; any other role gets PERMISSION_DENIED. With no
credential a token-mode server answers UNAUTHENTICATED; a mutual-TLS server refuses the TLS
handshake itself, which the client sees as UNAVAILABLE.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory

from services.adapter_store.app import build as build_store
from services.adapter_store.settings import StoreSettings
from services.attribution.app import build as build_attribution
from services.common.grpc_client import channel_credentials
from services.common.trust.roles import AUTHORIZATION, Role
from services.common.trust.tokens import TOKEN_METADATA_KEY
from tests.integration.attribution.wire import attribution_settings
from tests.integration.trust.fuzz_stack import method_descriptor
from tests.integration.worker.kit import WorkerUnderTest, worker_settings
from tests.kit.certs import CertFiles, make_certs
from tests.kit.service_auth import identity

Code = grpc.StatusCode
CALL_TIMEOUT_S = 10.0
# WatchRewards never ends by itself: an allowed caller is still being served when this runs out.
ENDLESS_TIMEOUT_S = 1.0
ENDLESS = {"/openlora.v1.Attribution/WatchRewards"}

# What each handler answers an empty request once the caller may call it.
HANDLER_ANSWERS: dict[str, Code] = {
    "/openlora.v1.Inference/Generate": Code.INVALID_ARGUMENT,
    "/openlora.v1.Inference/ListModels": Code.OK,
    "/openlora.v1.WorkerRelay/Relay": Code.OK,
    "/openlora.v1.AdapterStore/Upload": Code.INVALID_ARGUMENT,
    "/openlora.v1.AdapterStore/Import": Code.INVALID_ARGUMENT,
    "/openlora.v1.AdapterStore/Get": Code.INVALID_ARGUMENT,
    "/openlora.v1.AdapterStore/List": Code.OK,
    "/openlora.v1.AdapterStore/Delete": Code.INVALID_ARGUMENT,
    "/openlora.v1.AdapterStore/Download": Code.INVALID_ARGUMENT,
    "/openlora.v1.AdapterStore/RegisterBaseModel": Code.INVALID_ARGUMENT,
    "/openlora.v1.AdapterStore/ListBaseModels": Code.OK,
    "/openlora.v1.Attribution/RecordUsage": Code.OK,
    "/openlora.v1.Attribution/StreamUsage": Code.OK,
    "/openlora.v1.Attribution/GetUsage": Code.OK,
    "/openlora.v1.Attribution/GetRewards": Code.OK,
    "/openlora.v1.Attribution/WatchRewards": Code.DEADLINE_EXCEEDED,
    "/openlora.v1.Attribution/RegisterProvenance": Code.INVALID_ARGUMENT,
    "/openlora.v1.Attribution/SetPrice": Code.INVALID_ARGUMENT,
}

CALLERS = ("nobody", *(role.value for role in Role), "stranger")


def expected(component: str, method: str, caller: str, mode: str) -> Code:
    if caller == "nobody":
        return Code.UNAUTHENTICATED if mode == "tokens" else Code.UNAVAILABLE
    if caller in {r.value for r in AUTHORIZATION[component][method]}:
        return HANDLER_ANSWERS[method]
    if caller == "stranger" and mode == "tokens":
        return Code.UNAUTHENTICATED  # a token signed with another secret proves nothing
    return Code.PERMISSION_DENIED


async def call(channel: grpc.aio.Channel, full_name: str, metadata: tuple[tuple[str, str], ...]) -> Code:
    """The status of `full_name` called with an empty request (streams: no messages)."""
    method = method_descriptor(full_name)
    request = message_factory.GetMessageClass(method.input_type)()
    serialize: dict[str, Any] = {"request_serializer": lambda m: m.SerializeToString()}
    timeout = ENDLESS_TIMEOUT_S if full_name in ENDLESS else CALL_TIMEOUT_S
    options: dict[str, Any] = {"timeout": timeout, "metadata": metadata}
    if method.client_streaming:
        kind = channel.stream_stream if method.server_streaming else channel.stream_unary
        streaming: Any = kind(full_name, **serialize)(**options)
        # A call the server refused before reading, or a channel that never connected, fails the
        # write (grpc raises its internal ExecuteBatchError then): the status below says why.
        with contextlib.suppress(Exception):
            await streaming.done_writing()
    elif method.server_streaming:
        streaming = channel.unary_stream(full_name, **serialize)(request, **options)
    else:
        streaming = channel.unary_unary(full_name, **serialize)(request, **options)
    with contextlib.suppress(grpc.aio.AioRpcError):
        if method.server_streaming:
            async for _ in streaming:
                pass
        else:
            await streaming
    code: Code = await streaming.code()
    return code


@dataclass
class Served:
    ports: dict[str, int]
    certs: CertFiles


@pytest.fixture(params=["tokens", "mtls"])
async def served(
    request: pytest.FixtureRequest, tmp_path: Path, tiny_llama_dir: Path
) -> AsyncIterator[tuple[str, Served]]:
    """Store, attribution and a worker (tiny model) checking their callers the `request.param` way."""
    mode: str = request.param
    (tmp_path / "certs").mkdir()
    certs = make_certs(tmp_path / "certs")
    auth: dict[str, Any] = {}
    if mode == "mtls":
        auth = {
            "service_secret_file": None,
            "tls_cert_file": certs.server_cert,
            "tls_key_file": certs.server_key,
            "tls_client_ca_file": certs.ca,
        }
    store = build_store(
        StoreSettings(port=0, backend="local", local_dir=tmp_path / "store", log_level="ERROR", **auth)
    )
    attribution = build_attribution(
        attribution_settings(f"sqlite:///{tmp_path / 'ledger.sqlite3'}", log_level="ERROR", **auth)
    )
    worker = None
    try:
        ports = {"store": await store.start(), "attribution": await attribution.start()}
        worker = await WorkerUnderTest.start(worker_settings(tmp_path / "worker", tiny_llama_dir, **auth))
        ports["worker"] = worker.port
        yield mode, Served(ports, certs)
    finally:
        if worker is not None:
            await worker.stop()
        await attribution.close()
        await store.stop()


def _channel(mode: str, port: int, certs: CertFiles, caller: str) -> grpc.aio.Channel:
    if mode == "tokens":
        return grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    if caller == "nobody":
        return grpc.aio.secure_channel(f"localhost:{port}", channel_credentials(certs.ca))
    cert, key = certs.role(caller)
    return grpc.aio.secure_channel(f"localhost:{port}", channel_credentials(certs.ca, cert, key))


def _metadata(mode: str, component: str, caller: str) -> tuple[tuple[str, str], ...]:
    if mode != "tokens" or caller == "nobody":
        return ()
    if caller == "stranger":  # a well-formed token, signed with another cluster's secret
        from services.common.trust.tokens import TokenMinter

        return ((TOKEN_METADATA_KEY, TokenMinter(b"another cluster" * 4, Role.OPERATOR).token(component)),)
    return (identity(Role(caller)).metadata(component),)


async def test_every_cell_of_the_authorization_table(served: tuple[str, Served]) -> None:
    mode, services = served
    got: dict[tuple[str, str, str], Code] = {}
    want: dict[tuple[str, str, str], Code] = {}
    for component, methods in AUTHORIZATION.items():
        for caller in CALLERS:
            async with _channel(mode, services.ports[component], services.certs, caller) as channel:
                for method in methods:
                    cell = (component, method, caller)
                    got[cell] = await call(channel, method, _metadata(mode, component, caller))
                    want[cell] = expected(component, method, caller, mode)
    wrong = {cell: (got[cell].name, want[cell].name) for cell in want if got[cell] != want[cell]}
    assert not wrong, f"{len(wrong)} of {len(want)} cells differ (got, want): {wrong}"


async def test_health_stays_open_to_anyone(served: tuple[str, Served]) -> None:
    mode, services = served
    if mode == "mtls":
        pytest.skip("a mutual-TLS server admits no one without a certificate, probes included")
    for port in services.ports.values():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert await call(channel, "/grpc.health.v1.Health/Check", ()) == Code.OK
