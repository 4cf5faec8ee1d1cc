"""Uploads beyond `max_concurrent_ingests` wait their turn, and past `max_waiting_ingests` are
refused before their bytes are sent; while an upload holds the store, Get still answers at once
(uploads validate on threads of their own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from openlora.files import adapter_files, declare
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as pb

from tests.integration.adapter_store.conftest import start_store, store_settings
from tests.integration.adapter_store.test_round_trip import header, ref
from tests.kit.waits import within
from tests.kit.work_clock import WorkClock


async def test_uploads_wait_their_turn_one_too_many_is_refused_and_reads_keep_answering(
    tmp_path: Path, tiny_llama_dir: Path, peft_adapter: Path
) -> None:
    store = await start_store(
        store_settings("local", tmp_path, None, max_concurrent_ingests=1, max_waiting_ingests=1),
        tiny_llama_dir,
    )
    try:
        await upload(store.stub, header("acme/first"), adapter_files(peft_adapter))
        # An upload that sends its header, then stalls: it holds the store's one ingest slot.
        stalled_header = header("acme/stalled")
        stalled_header.files.extend(
            pb.FileEntry(name=d.name, size=d.size, sha256=d.sha256)
            for d in declare(adapter_files(peft_adapter))
        )
        release = asyncio.Event()

        async def stalled_chunks() -> AsyncIterator[pb.UploadChunk]:
            yield pb.UploadChunk(header=stalled_header)
            await release.wait()

        stalled = store.stub.Upload(stalled_chunks())
        await stalled.initial_metadata()  # accepted: the slot is taken
        waiting = asyncio.ensure_future(
            upload(store.stub, header("acme/second"), adapter_files(peft_adapter))
        )
        await asyncio.sleep(0.5)
        assert not waiting.done(), "the second upload waits for its turn"
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await upload(store.stub, header("acme/third"), adapter_files(peft_adapter))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        started = WorkClock()
        assert (await store.stub.Get(ref("acme/first"))).id == "acme/first"
        assert started.elapsed() < 5
        stalled.cancel()
        release.set()
        # The slot comes back with the stalled upload's end, and the waiting one goes through.
        assert (await within(waiting, 30)).id == "acme/second"
    finally:
        await store.channel.close()
        await store.server.stop()
