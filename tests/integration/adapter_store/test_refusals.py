"""Every kind of bad adapter is refused with INVALID_ARGUMENT naming the problem, and nothing is stored."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from openlora.v1 import adapter_store_pb2 as pb

from tests.integration.adapter_store.bad_adapters import CASES, SENTINEL, good
from tests.integration.adapter_store.conftest import BASE, StoreUnderTest
from tests.integration.adapter_store.test_round_trip import header


async def send(store: StoreUnderTest, head: pb.UploadHeader, files: dict[str, bytes]) -> grpc.aio.AioRpcError:
    """Upload raw files (declared with their true sizes and digests unless the header says otherwise)."""
    if not head.files:
        head.files.extend(
            pb.FileEntry(name=n, size=len(d), sha256=hashlib.sha256(d).hexdigest()) for n, d in files.items()
        )

    async def chunks() -> AsyncIterator[pb.UploadChunk]:
        yield pb.UploadChunk(header=head)
        for data in files.values():
            for start in range(0, len(data), 64 * 1024):
                yield pb.UploadChunk(data=data[start : start + 64 * 1024])

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await store.stub.Upload(chunks())
    return caught.value


@pytest.mark.parametrize("case", sorted(CASES))
async def test_bad_adapter_is_refused_and_leaves_nothing(
    store: StoreUnderTest, peft_adapter: Path, case: str
) -> None:
    bad = CASES[case]
    SENTINEL.unlink(missing_ok=True)
    error = await send(
        store, header(bad.header_id, base_model=bad.base_model or BASE), bad.files(peft_adapter)
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert bad.expect in (error.details() or ""), error.details()
    assert store.adapter_keys() == []
    assert not SENTINEL.exists(), "a payload of the upload ran or was unpacked where it pointed"


async def test_sha256_mismatch_is_refused(store: StoreUnderTest, peft_adapter: Path) -> None:
    files = good(peft_adapter)
    head = header("checked")
    for name, data in files.items():
        head.files.append(
            pb.FileEntry(name=name, size=len(data), sha256=hashlib.sha256(b"other").hexdigest())
        )
    error = await send(store, head, files)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "header.files[0].sha256" in (error.details() or "")
    assert store.adapter_keys() == []


async def test_stream_shorter_than_declared_is_refused(store: StoreUnderTest, peft_adapter: Path) -> None:
    files = good(peft_adapter)
    head = header("short")
    for i, (name, data) in enumerate(files.items()):
        extra = 10 if i == len(files) - 1 else 0  # the last file is declared longer than what is sent
        head.files.append(
            pb.FileEntry(name=name, size=len(data) + extra, sha256=hashlib.sha256(data).hexdigest())
        )
    error = await send(store, head, files)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "stream ended" in (error.details() or "")
    assert store.adapter_keys() == []


async def test_over_the_size_limit_is_refused_before_reading(
    store: StoreUnderTest, peft_adapter: Path
) -> None:
    head = header("huge")
    limit = store.service.settings.max_adapter_bytes
    head.files.extend(
        [
            pb.FileEntry(name="adapter_config.json", size=10, sha256="0" * 64),
            pb.FileEntry(name="adapter_model.safetensors", size=limit, sha256="0" * 64),
        ]
    )
    error = await send(store, head, {})
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "upload limit" in (error.details() or "")


async def test_data_before_header_is_refused(store: StoreUnderTest) -> None:
    async def chunks() -> AsyncIterator[pb.UploadChunk]:
        yield pb.UploadChunk(data=b"sneaky")

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await store.stub.Upload(chunks())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "header" in (
        caught.value.details() or ""
    )
