"""Import from file://, s3://, http(s):// and hf:// sources, each validated like an upload."""

from __future__ import annotations

import shutil
from pathlib import Path

import grpc
import pytest
from openlora.v1 import adapter_store_pb2 as pb

from tests.integration.adapter_store.conftest import BASE, StoreUnderTest, start_store, store_settings
from tests.kit.adapters import tar_folder
from tests.kit.http_servers import fake_hub, static_files
from tests.kit.seaweedfs import S3Endpoint


async def started(
    tmp_path: Path, base: Path, s3: S3Endpoint | None = None, **settings: object
) -> StoreUnderTest:
    values: dict[str, object] = {}
    if s3 is not None:  # s3:// imports use their own S3 connection, whatever the store's backend
        values = {
            "import_s3_endpoint_url": s3.endpoint_url,
            "import_s3_access_key_id": s3.access_key,
            "import_s3_secret_access_key": s3.secret_key,
            "import_s3_buckets": ["imports-*"],
        }
    return await start_store(store_settings("local", tmp_path, None, **(values | settings)), base)


async def import_uri(store: StoreUnderTest, uri: str, **fields: object) -> pb.AdapterInfo:
    return await store.stub.Import(pb.ImportRequest(source_uri=uri, base_model=BASE, **fields))  # type: ignore[arg-type]


async def refused(store: StoreUnderTest, uri: str) -> str:
    """Import uri expecting INVALID_ARGUMENT; the store must hold exactly what it held before."""
    before = store.adapter_keys()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await import_uri(store, uri)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
    assert store.adapter_keys() == before
    return caught.value.details() or ""


async def stop(store: StoreUnderTest) -> None:
    await store.channel.close()
    await store.server.stop()


async def test_file_import_only_inside_allowed_roots(
    tmp_path: Path, tiny_llama_dir: Path, peft_adapter: Path
) -> None:
    root = tmp_path / "imports"
    shutil.copytree(peft_adapter, root / "poet")
    (root / "poet.tar").write_bytes(tar_folder(peft_adapter))
    store = await started(tmp_path, tiny_llama_dir, import_schemes=["file"], import_file_roots=[root])
    try:
        info = await import_uri(store, f"file://{root}/poet", provenance=pb.Provenance(trainer="bob"))
        assert (info.id, info.rank, info.provenance.trainer) == ("poet", 8, "bob")
        from_tar = await import_uri(store, f"file://{root}/poet.tar", id="poet-tar")
        assert from_tar.digest == info.digest
        (tmp_path / "elsewhere").mkdir()
        shutil.copytree(peft_adapter, tmp_path / "elsewhere" / "x")
        with pytest.raises(grpc.aio.AioRpcError) as outside:
            await import_uri(store, f"file://{tmp_path}/elsewhere/x")
        assert "outside the directories" in (outside.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as climbing:
            await import_uri(store, f"file://{root}/../elsewhere/x")
        assert "outside the directories" in (climbing.value.details() or "")
    finally:
        await stop(store)


async def test_disabled_schemes_are_refused(tmp_path: Path, tiny_llama_dir: Path, peft_adapter: Path) -> None:
    store = await started(tmp_path, tiny_llama_dir)  # defaults: hf, s3, https
    try:
        assert "not enabled" in await refused(store, f"file://{peft_adapter}")
        assert "not enabled" in await refused(store, "http://example.com/a.tar")
        assert "not a URI" in await refused(store, "just-a-name")
    finally:
        await stop(store)


async def test_http_import_and_private_network_protection(
    tmp_path: Path, tiny_llama_dir: Path, peft_adapter: Path
) -> None:
    site = tmp_path / "site"
    shutil.copytree(peft_adapter, site / "adapters" / "poet")
    (site / "poet.tar").write_bytes(tar_folder(peft_adapter))
    with static_files(site) as base_url:
        guarded = await started(tmp_path / "a", tiny_llama_dir, import_schemes=["http"])
        try:  # loopback is a private address: refused unless the operator allows it
            assert "non-public address" in await refused(guarded, f"{base_url}/poet.tar")
        finally:
            await stop(guarded)
        store = await started(
            tmp_path / "b", tiny_llama_dir, import_schemes=["http"], import_allow_private_networks=True
        )
        try:
            from_tar = await import_uri(store, f"{base_url}/poet.tar")
            from_folder = await import_uri(store, f"{base_url}/adapters/poet", id="poet-folder")
            assert from_tar.id == "poet" and from_tar.digest == from_folder.digest
            assert "answered 404" in await refused(store, f"{base_url}/missing.tar")
            assert "pickle" in await refused(store, f"{base_url}/adapter_model.bin")
        finally:
            await stop(store)
        allow_listed = await started(
            tmp_path / "c",
            tiny_llama_dir,
            import_schemes=["http"],
            import_allow_private_networks=True,
            import_allowed_hosts=["*.example.com"],
        )
        try:
            assert "allow-list" in await refused(allow_listed, f"{base_url}/poet.tar")
        finally:
            await stop(allow_listed)


async def test_s3_import(
    tmp_path: Path, tiny_llama_dir: Path, peft_adapter: Path, s3_server: S3Endpoint
) -> None:
    client = s3_server.client()
    client.create_bucket(Bucket="imports-src")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        client.put_object(
            Bucket="imports-src", Key=f"team/poet/{name}", Body=(peft_adapter / name).read_bytes()
        )
    store = await started(tmp_path, tiny_llama_dir, s3=s3_server)
    try:
        info = await import_uri(store, "s3://imports-src/team/poet")
        assert info.id == "team/poet" and info.rank == 8
        assert "NoSuchKey" in await refused(store, "s3://imports-src/team/nothing-here")
        # The store's own bucket, or any other its identity could read, is not an import source.
        assert "not one s3 imports may read" in await refused(store, "s3://openlora-adapters/team/poet")
    finally:
        await stop(store)
    unlisted = await started(tmp_path / "unlisted", tiny_llama_dir, s3=s3_server, import_s3_buckets=[])
    try:
        assert "import_s3_buckets is empty" in await refused(unlisted, "s3://imports-src/team/poet")
    finally:
        await stop(unlisted)
        for obj in client.list_objects_v2(Bucket="imports-src").get("Contents", []):
            client.delete_object(Bucket="imports-src", Key=obj["Key"])
        client.delete_bucket(Bucket="imports-src")


async def test_hf_import_through_hf_endpoint(
    tmp_path: Path, tiny_llama_dir: Path, peft_adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with fake_hub({"acme/poet-lora": peft_adapter}) as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        store = await started(tmp_path, tiny_llama_dir)
        try:
            info = await import_uri(store, "hf://acme/poet-lora@main")
            assert (info.id, info.rank) == ("acme/poet-lora", 8)
            assert "EntryNotFound" in await refused(store, "hf://acme/missing-repo")
            assert "expected hf://org/repo" in await refused(store, "hf://no-org")
        finally:
            await stop(store)
        # The Hub's metadata says the weights are over the limit: refused before they are fetched.
        weights = (peft_adapter / "adapter_model.safetensors").stat().st_size
        small = await started(tmp_path / "small", tiny_llama_dir, max_adapter_bytes=max(1024, weights // 2))
        try:
            assert "bytes on the Hub, over the" in await refused(small, "hf://acme/poet-lora@main")
        finally:
            await stop(small)
