"""An import connects to the address it checked: a name that answers a public address for the check
and 127.0.0.1 afterwards (DNS rebinding) is refused, and nothing reaches the loopback server behind it.

The resolver and the socket opener are the test's: the resolver answers what an attacker's DNS
would, the opener records every connection and lets only loopback through (no traffic leaves the
machine; a "public" connection is refused as if the host were down).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import grpc
import pytest

from services.adapter_store.sources import policy
from tests.integration.adapter_store.test_imports import import_uri, refused, started, stop
from tests.kit.adapters import tar_folder
from tests.kit.http_servers import serve_handler, static_files

PUBLIC = "93.184.216.34"


class Network:
    """What the store's imports see of DNS and of the network."""

    def __init__(self, answers: list[str]) -> None:
        self.answers = answers  # one per lookup; the last repeats
        self.lookups: list[str] = []
        self.connections: list[tuple[str, int]] = []

    def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        return [self.answers[min(len(self.lookups), len(self.answers)) - 1]]

    def open_socket(self, address: tuple[str, int], *args: object) -> socket.socket:
        self.connections.append(address)
        if address[0] != "127.0.0.1":
            raise ConnectionRefusedError(f"{address[0]} is outside this test's machine")
        return socket.create_connection(address, *args)  # type: ignore[arg-type]


@pytest.fixture
def site(tmp_path: Path, peft_adapter: Path) -> Iterator[int]:
    """A loopback web server holding an adapter: the internal service rebinding would reach. Its port."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "poet.tar").write_bytes(tar_folder(peft_adapter))
    with static_files(tmp_path / "site") as base_url:
        yield int(base_url.rsplit(":", 1)[1])


def use(network: Network, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(policy, "system_resolve", network.resolve)
    monkeypatch.setattr(policy, "open_socket", network.open_socket)


async def test_a_name_rebound_to_loopback_after_the_check_is_refused(
    tmp_path: Path, tiny_llama_dir: Path, site: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = Network([PUBLIC, "127.0.0.1"])
    use(network, monkeypatch)
    store = await started(tmp_path / "store", tiny_llama_dir, import_schemes=["http"])
    try:
        details = await refused(store, f"http://rebind.example:{site}/poet.tar")
    finally:
        await stop(store)
    assert "127.0.0.1, a non-public address" in details
    assert len(network.lookups) >= 2  # checked public first, then rebound
    assert network.connections == []  # the rebound answer was refused before any connection


async def test_the_connection_goes_to_the_checked_address_and_only_there(
    tmp_path: Path, tiny_llama_dir: Path, site: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = Network([PUBLIC])
    use(network, monkeypatch)
    store = await started(tmp_path / "store", tiny_llama_dir, import_schemes=["http"])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await import_uri(store, f"http://public.example:{site}/poet.tar")
    finally:
        await stop(store)
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE  # the "public" host was down
    assert network.connections and {host for host, _ in network.connections} == {PUBLIC}


async def test_with_private_networks_allowed_the_pinned_connection_still_serves(
    tmp_path: Path, tiny_llama_dir: Path, site: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    network = Network(["127.0.0.1"])
    use(network, monkeypatch)
    store = await started(
        tmp_path / "store", tiny_llama_dir, import_schemes=["http"], import_allow_private_networks=True
    )
    try:
        info = await import_uri(store, f"http://internal.example:{site}/poet.tar")
    finally:
        await stop(store)
    assert info.id == "poet"
    assert {host for host, _ in network.connections} == {"127.0.0.1"}


async def test_an_operators_egress_proxy_is_used_and_the_host_still_checked(
    tmp_path: Path, tiny_llama_dir: Path, peft_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `import_proxy_url`, the fetch goes to the proxy (on a private address, as proxies are),
    never straight to the host, and a host resolving to an internal address is still refused."""
    archive = tar_folder(peft_adapter)
    asked: list[str] = []

    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # a forward proxy sees the absolute URL
            asked.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args: object) -> None:
            pass

    server, thread = serve_handler(Proxy)
    network = Network([PUBLIC])
    use(network, monkeypatch)
    proxy = f"http://127.0.0.1:{server.server_address[1]}"
    store = await started(tmp_path / "store", tiny_llama_dir, import_schemes=["http"], import_proxy_url=proxy)
    try:
        info = await import_uri(store, "http://files.example/poet.tar")
        network.answers = ["10.0.0.7"]
        details = await refused(store, "http://intranet.example/poet.tar")
    finally:
        await stop(store)
        server.shutdown()
        thread.join()
    assert info.id == "poet" and asked == ["http://files.example/poet.tar"]
    assert "10.0.0.7, a non-public address" in details
    assert {host for host, _ in network.connections} == {"127.0.0.1"}  # only ever the proxy
