"""A 200 MB adapter goes through upload and download without the store holding it in memory."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from openlora.files import adapter_files
from openlora.transfer import download, upload
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import common_pb2

from services.cluster.synthetic_adapters import write_adapter
from tests.integration.adapter_store.conftest import start_store, store_settings
from tests.kit.adapters import sha256_file
from tests.kit.seaweedfs import S3Endpoint

BIG_MODEL: dict[str, int | str] = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "num_hidden_layers": 32,
}


@pytest.mark.slow
async def test_200mb_adapter_streams_in_bounded_memory(tmp_path: Path, s3_server: S3Endpoint) -> None:
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(BIG_MODEL))
    # rank 64 on q/k/v/o: 2 MiB per module, 25 layers -> 200 MiB of fp32 weights.
    adapter = write_adapter(
        tmp_path / "big", BIG_MODEL, rank=64, targets=["q_proj", "k_proj", "v_proj", "o_proj"], layers=25
    )
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert size > 200 * 1024 * 1024
    settings = store_settings("s3", tmp_path, s3_server, max_adapter_bytes=512 * 1024 * 1024)
    store = await start_store(settings, tmp_path / "base")
    try:
        # the store's base registration used the tiny config path; register the big one under its own name
        await store.stub.RegisterBaseModel(
            pb.RegisterBaseModelRequest(name="big", config_json=json.dumps(BIG_MODEL))
        )
        info = await upload(
            store.stub, pb.UploadHeader(id="big-one", base_model="big"), adapter_files(adapter)
        )
        assert info.size_bytes == size

        tracemalloc.start()
        try:
            ref = pb.GetAdapterRequest(adapter=common_pb2.AdapterRef(id="big-one"))
            await download(store.stub, ref, tmp_path / "dl")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert sha256_file(tmp_path / "dl" / "adapter_model.safetensors") == info.digest
        # server and client together: a few 1 MiB chunks in flight, never the 200 MiB adapter
        assert peak < 32 * 1024 * 1024, f"peak Python allocations {peak / 2**20:.1f} MiB during download"
    finally:
        await store.channel.close()
        await store.server.stop()
