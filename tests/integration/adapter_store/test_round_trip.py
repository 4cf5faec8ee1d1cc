"""Upload, get, list, download and delete against a real server, on both backends."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from openlora.files import adapter_files
from openlora.transfer import download, upload
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import common_pb2
from safetensors.torch import load_file

from tests.integration.adapter_store.conftest import BASE, StoreUnderTest
from tests.kit.adapters import make_peft_adapter, tar_folder


def header(adapter_id: str, **fields: object) -> pb.UploadHeader:
    provenance = pb.Provenance(
        trainer="alice",
        datasets=["hf://datasets/acme/poems"],
        contributors=[
            pb.Contributor(id="alice", role=pb.TRAINER, share=0.7),
            pb.Contributor(id="acme-data", role=pb.DATA, share=0.3),
        ],
    )
    values: dict[str, object] = {
        "id": adapter_id,
        "owner": "acme",
        "visibility": pb.PUBLIC,
        "provenance": provenance,
        "base_model": BASE,
    }
    return pb.UploadHeader(**(values | fields))  # type: ignore[arg-type]


def ref(adapter_id: str, version: str = "") -> pb.GetAdapterRequest:
    return pb.GetAdapterRequest(adapter=common_pb2.AdapterRef(id=adapter_id, version=version))


async def test_upload_get_list_download_delete(
    store: StoreUnderTest, peft_adapter: Path, tmp_path: Path
) -> None:
    info = await upload(store.stub, header("acme/poet"), adapter_files(peft_adapter))
    assert (info.id, info.rank, info.alpha, info.base_model) == ("acme/poet", 8, 16.0, BASE)
    assert list(info.target_modules) == ["down_proj", "o_proj", "q_proj", "v_proj"]
    assert len(info.digest) == 64 and info.version.startswith("v")
    assert [c.id for c in info.provenance.contributors] == ["alice", "acme-data"]

    got = await store.stub.Get(ref("acme/poet"))
    assert got == info
    listed = await store.stub.List(pb.ListAdaptersRequest())
    assert [a.id for a in listed.adapters] == ["acme/poet"]

    fetched = await download(store.stub, ref("acme/poet"), tmp_path / "dl")
    assert fetched.digest == info.digest
    original = load_file(peft_adapter / "adapter_model.safetensors")
    downloaded = load_file(tmp_path / "dl" / "adapter_model.safetensors")
    assert original.keys() == downloaded.keys()
    for name, tensor in original.items():
        assert tensor.dtype == downloaded[name].dtype
        assert tensor.numpy().tobytes() == downloaded[name].numpy().tobytes()

    from peft import LoraConfig  # the canonical config is one PEFT reads

    config = LoraConfig.from_pretrained(str(tmp_path / "dl"))
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (8, 16, list(info.target_modules))

    deleted = await store.stub.Delete(pb.DeleteAdapterRequest(adapter=common_pb2.AdapterRef(id="acme/poet")))
    assert list(deleted.deleted_versions) == [info.version]
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await store.stub.Get(ref("acme/poet"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert store.adapter_keys() == []


async def test_new_version_keeps_the_old_one(
    store: StoreUnderTest, peft_adapter: Path, tiny_llama_dir: Path, tmp_path: Path
) -> None:
    first = await upload(store.stub, header("poet"), adapter_files(peft_adapter))
    other = make_peft_adapter(tiny_llama_dir, tmp_path / "v2", rank=16, seed=2)
    second = await upload(store.stub, header("poet"), [p for p in adapter_files(other)])
    assert second.version > first.version and second.digest != first.digest
    assert (await store.stub.Get(ref("poet"))).version == second.version
    assert (await store.stub.Get(ref("poet", first.version))).rank == 8
    await download(store.stub, ref("poet", first.version), tmp_path / "old")
    assert (
        load_file(tmp_path / "old" / "adapter_model.safetensors").keys()
        == load_file(peft_adapter / "adapter_model.safetensors").keys()
    )

    await store.stub.Delete(
        pb.DeleteAdapterRequest(adapter=common_pb2.AdapterRef(id="poet", version=second.version))
    )
    assert (await store.stub.Get(ref("poet"))).version == first.version
    assert not store.blobs.exists(f"blobs/sha256/{second.digest}")
    assert store.blobs.exists(f"blobs/sha256/{first.digest}")


async def test_tar_upload_and_identical_weights_share_one_blob(
    store: StoreUnderTest, peft_adapter: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "poet.tar"
    archive.write_bytes(tar_folder(peft_adapter))
    from_tar = await upload(store.stub, header("from-tar"), [archive])
    from_files = await upload(store.stub, header("from-files"), adapter_files(peft_adapter))
    assert from_tar.digest == from_files.digest
    assert len(store.stored_keys("blobs/")) == 1
    await store.stub.Delete(pb.DeleteAdapterRequest(adapter=common_pb2.AdapterRef(id="from-tar")))
    assert store.blobs.exists(f"blobs/sha256/{from_files.digest}")  # still used by from-files


async def test_list_filters_and_pages(store: StoreUnderTest, peft_adapter: Path) -> None:
    for i in range(5):
        await upload(
            store.stub, header(f"team{i % 2}/a{i}", owner=f"team{i % 2}"), adapter_files(peft_adapter)
        )
    seen, token = [], ""
    while True:
        page = await store.stub.List(pb.ListAdaptersRequest(page_size=2, page_token=token))
        assert len(page.adapters) <= 2
        seen += [a.id for a in page.adapters]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == 5
    team0 = await store.stub.List(pb.ListAdaptersRequest(owner="team0"))
    assert sorted(a.id for a in team0.adapters) == ["team0/a0", "team0/a2", "team0/a4"]
    assert not (await store.stub.List(pb.ListAdaptersRequest(base_model="other-model"))).adapters
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await store.stub.List(pb.ListAdaptersRequest(page_token="not a token!"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in (
        bad.value.details() or ""
    )


@pytest.mark.slow
async def test_concurrent_uploads_and_downloads(
    store: StoreUnderTest, peft_adapter: Path, tmp_path: Path
) -> None:
    infos = await asyncio.gather(
        *(upload(store.stub, header(f"bulk/a{i:02d}"), adapter_files(peft_adapter)) for i in range(50))
    )
    assert len({i.id for i in infos}) == 50 and len({i.digest for i in infos}) == 1
    results = await asyncio.gather(
        *(
            download(store.stub, ref(f"bulk/a{(c * 7 + k) % 50:02d}"), tmp_path / f"c{c}-{k}")
            for c in range(8)
            for k in range(3)
        )
    )
    assert all(r.digest == infos[0].digest for r in results)


@pytest.mark.slow
async def test_deleting_while_uploading_the_same_weights_never_loses_the_blob(
    store: StoreUnderTest, peft_adapter: Path, tmp_path: Path
) -> None:
    await upload(store.stub, header("churn/a0"), adapter_files(peft_adapter))
    for i in range(1, 12):
        await asyncio.gather(
            store.stub.Delete(pb.DeleteAdapterRequest(adapter=common_pb2.AdapterRef(id=f"churn/a{i - 1}"))),
            upload(store.stub, header(f"churn/a{i}"), adapter_files(peft_adapter)),
        )
        await download(store.stub, ref(f"churn/a{i}"), tmp_path / f"dl{i}")  # the weights are still there
    assert len(store.stored_keys("blobs/")) == 1
