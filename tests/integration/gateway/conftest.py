"""A real adapter store (local backend) holding one public and one private adapter, and fake workers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc

from services.adapter_store.app import StoreApp
from services.adapter_store.app import build as build_store
from services.adapter_store.settings import StoreSettings
from services.cluster.synthetic_adapters import write_adapter
from services.common.grpc_client import open_channel
from tests.integration.gateway.kit import GatewayUnderTest, InProcessWorkers, gateway_settings
from tests.kit.service_auth import trusted

BASE = "mini-llama"
MINI_CONFIG: dict[str, int | str] = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "vocab_size": 256,
}
PUBLIC_ADAPTER = "shared-poet"
PRIVATE_ADAPTER = "acme/secret"


@dataclass
class StoreUnderTest:
    server: StoreApp
    channel: grpc.aio.Channel
    stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub
    address: str
    adapter_dir: Path


async def put_adapter(
    stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub,
    folder: Path,
    adapter_id: str,
    owner: str,
    public: bool,
    base_model: str = BASE,
) -> store_pb.AdapterInfo:
    header = store_pb.UploadHeader(
        id=adapter_id,
        owner=owner,
        base_model=base_model,
        visibility=store_pb.PUBLIC if public else store_pb.PRIVATE,
    )
    return await upload(stub, header, adapter_files(folder))


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[StoreUnderTest]:
    settings = StoreSettings(port=0, backend="local", local_dir=tmp_path / "store", log_level="WARNING")
    server = build_store(settings)
    port = await server.start()
    channel = open_channel(f"127.0.0.1:{port}", **trusted("store"))
    stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
    await stub.RegisterBaseModel(
        store_pb.RegisterBaseModelRequest(name=BASE, config_json=json.dumps(MINI_CONFIG))
    )
    folder = write_adapter(
        tmp_path / "adapter", MINI_CONFIG, rank=2, targets=["q_proj", "v_proj"], base_model=BASE
    )
    await put_adapter(stub, folder, PUBLIC_ADAPTER, owner="", public=True)
    await put_adapter(stub, folder, PRIVATE_ADAPTER, owner="acme", public=False)
    yield StoreUnderTest(server, channel, stub, f"127.0.0.1:{port}", folder)
    await channel.close()
    await server.stop()


@pytest.fixture
async def fake_workers() -> AsyncIterator[InProcessWorkers]:
    workers = await InProcessWorkers.start(3, delay_s=0.01)
    yield workers
    await workers.stop()


@pytest.fixture
async def store_gateway(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> AsyncIterator[GatewayUnderTest]:
    """A gateway in front of the fake workers and the real store (its tenant-facing store API on)."""
    started = await GatewayUnderTest.start(
        gateway_settings(tmp_path, fake_workers.addresses, store_address=store.address), wait_workers=3
    )
    yield started
    await started.stop()
