"""A real AdapterStore server per test, on the local-directory backend and on SeaweedFS S3."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import adapter_store_pb2_grpc

from services.adapter_store.app import StoreApp
from services.adapter_store.app import build as build_store
from services.adapter_store.blobs import BlobBackend
from services.adapter_store.service import AdapterStoreService
from services.adapter_store.settings import StoreSettings
from services.common.grpc_client import open_channel
from tests.kit.adapters import make_peft_adapter
from tests.kit.seaweedfs import S3Endpoint
from tests.kit.service_auth import trusted

BASE = "tiny-llama"


@dataclass
class StoreUnderTest:
    stub: adapter_store_pb2_grpc.AdapterStoreAsyncStub
    service: AdapterStoreService
    server: StoreApp
    channel: grpc.aio.Channel

    @property
    def blobs(self) -> BlobBackend:
        return self.service.blobs

    def stored_keys(self, prefix: str = "") -> list[str]:
        return list(self.blobs.list_keys(prefix))

    def adapter_keys(self) -> list[str]:
        """Every key an adapter left (base model registrations excluded)."""
        return [k for k in self.stored_keys() if not k.startswith("base_models/")]


def store_settings(backend: str, tmp_path: Path, s3: S3Endpoint | None, **overrides: Any) -> StoreSettings:
    values: dict[str, Any] = {"port": 0, "backend": backend, "local_dir": tmp_path / "store", "max_rank": 64}
    if backend == "s3":
        assert s3 is not None
        values |= {
            "s3_endpoint_url": s3.endpoint_url,
            "s3_bucket": f"store-{uuid.uuid4().hex[:10]}",
            "s3_access_key_id": s3.access_key,
            "s3_secret_access_key": s3.secret_key,
        }
    return StoreSettings(**(values | overrides))


async def start_store(settings: StoreSettings, base_dir: Path) -> StoreUnderTest:
    service = AdapterStoreService(settings)
    server = build_store(settings, service)
    port = await server.start()
    channel = open_channel(f"127.0.0.1:{port}", **trusted("store"))
    stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
    await stub.RegisterBaseModel(
        pb.RegisterBaseModelRequest(name=BASE, config_json=(base_dir / "config.json").read_text())
    )
    return StoreUnderTest(stub, service, server, channel)


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def s3_for_backend(backend: str, request: pytest.FixtureRequest) -> S3Endpoint | None:
    return request.getfixturevalue("s3_server") if backend == "s3" else None


@pytest.fixture
async def store(
    backend: str, s3_for_backend: S3Endpoint | None, tmp_path: Path, tiny_llama_dir: Path
) -> AsyncIterator[StoreUnderTest]:
    running = await start_store(store_settings(backend, tmp_path, s3_for_backend), tiny_llama_dir)
    yield running
    await running.channel.close()
    await running.server.stop()


@pytest.fixture(scope="session")
def peft_adapter(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 PEFT adapter on the attention and MLP projections of the tiny Llama."""
    return make_peft_adapter(
        tiny_llama_dir,
        tmp_path_factory.mktemp("adapter"),
        rank=8,
        targets=["q_proj", "v_proj", "o_proj", "down_proj"],
        seed=1,
    )
