"""The Python client's adapter calls (`openlora.Client` / `AsyncClient`) through a real gateway and store:
typed results, the tenant's own namespace, verified downloads, errors as `OpenLoRAError`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest
from openlora import AdapterInfo, AsyncClient, Client, Contributor, OpenLoRAError, Provenance
from openlora.files import sha256_of

from tests.integration.gateway.conftest import BASE, PRIVATE_ADAPTER, PUBLIC_ADAPTER, StoreUnderTest
from tests.integration.gateway.kit import (
    ACME_KEY,
    GLOBEX_KEY,
    GatewayUnderTest,
)


async def test_a_tenant_manages_its_adapters_with_the_async_client(
    store_gateway: GatewayUnderTest, store: StoreUnderTest, tmp_path: Path
) -> None:
    provenance = Provenance(
        trainer="alice",
        datasets=("s3://acme/poems.jsonl",),
        contributors=(Contributor("alice", "trainer", 0.7), Contributor.parse("bob:data:0.3")),
    )
    sent: list[int] = []
    async with AsyncClient(f"127.0.0.1:{store_gateway.port}", api_key=ACME_KEY) as client:
        info = await client.upload_adapter(
            store.adapter_dir, "acme/poet", base_model=BASE, provenance=provenance, progress=sent.append
        )
        assert isinstance(info, AdapterInfo)
        assert (info.id, info.owner, info.visibility, info.base_model) == (
            "acme/poet",
            "acme",
            "private",
            BASE,
        )
        assert info.provenance == provenance
        assert info.rank == 2 and set(info.target_modules) == {"q_proj", "v_proj"}
        assert info.created_at is not None and info.created_at.tzinfo is not None
        assert sum(sent) == sum(p.stat().st_size for p in store.adapter_dir.iterdir())

        assert await client.get_adapter(info.ref) == info
        listed = {a.id for a in await client.list_adapters()}
        assert {"acme/poet", PRIVATE_ADAPTER, PUBLIC_ADAPTER} <= listed

        got = await client.download_adapter("acme/poet", tmp_path / "copy")
        assert got.digest == info.digest == sha256_of(tmp_path / "copy" / "adapter_model.safetensors")
        assert json.loads((tmp_path / "copy" / "adapter_config.json").read_text())["r"] == 2

        assert await client.delete_adapter("acme/poet") == [info.version]
        with pytest.raises(OpenLoRAError) as gone:
            await client.get_adapter("acme/poet")
        assert gone.value.code == grpc.StatusCode.NOT_FOUND


async def test_the_blocking_client_sees_what_the_tenant_may_see(store_gateway: GatewayUnderTest) -> None:
    target = f"127.0.0.1:{store_gateway.port}"

    def as_globex() -> tuple[set[str], OpenLoRAError, OpenLoRAError]:
        with Client(target, api_key=GLOBEX_KEY) as client:
            visible = {a.id for a in client.list_adapters()}
            try:
                client.get_adapter(PRIVATE_ADAPTER)  # acme's: as if it did not exist
            except OpenLoRAError as hidden:
                not_found = hidden
            with pytest.raises(FileNotFoundError):  # read before any call starts, so the caller's error
                client.upload_adapter(Path("/nonexistent"), "acme/stolen", base_model=BASE)
            try:
                client.import_adapter("hf://acme/stolen", adapter_id="acme/stolen")
            except OpenLoRAError as refused:
                wrong_namespace = refused
        return visible, not_found, wrong_namespace

    visible, not_found, wrong_namespace = await asyncio.to_thread(as_globex)
    assert PUBLIC_ADAPTER in visible and PRIVATE_ADAPTER not in visible
    assert not_found.code == grpc.StatusCode.NOT_FOUND
    assert wrong_namespace.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "id" in wrong_namespace.field_violations


async def test_the_client_reads_its_target_and_key_from_the_environment(
    store_gateway: GatewayUnderTest, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENLORA_TARGET", f"127.0.0.1:{store_gateway.port}")
    monkeypatch.setenv("OPENLORA_API_KEY", ACME_KEY)
    async with AsyncClient() as client:
        assert PRIVATE_ADAPTER in {a.id for a in await client.list_adapters(owner="acme")}
    monkeypatch.delenv("OPENLORA_API_KEY")
    async with AsyncClient() as anonymous:
        with pytest.raises(OpenLoRAError) as refused:
            await anonymous.list_adapters()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_a_refused_upload_reports_the_servers_status_every_time(
    store_gateway: GatewayUnderTest, store: StoreUnderTest
) -> None:
    """The gateway refuses another tenant's id at the header, while the client has bytes to send: the
    client waits for the header's acceptance, so it never writes into the ended call (grpc.aio would
    then report INTERNAL instead of the server's INVALID_ARGUMENT)."""
    async with AsyncClient(f"127.0.0.1:{store_gateway.port}", api_key=GLOBEX_KEY) as client:
        for _ in range(30):
            with pytest.raises(OpenLoRAError) as refused:
                await client.upload_adapter(store.adapter_dir, "acme/not-yours", base_model=BASE)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT, refused.value
            assert "header.id" in refused.value.field_violations
