"""Clients that do not read their streams: they never hold up the engine, and the worker's memory stays
bounded. Chunks the front has yielded wait in gRPC's send buffers (at most `max_new_tokens_limit`
tokens per stream); tokens the front has not yet turned into chunks are capped by
`stream_buffer_tokens` (tested on the engine client itself, where a consumer can be made to stall)."""

from __future__ import annotations

from pathlib import Path

import psutil

from tests.integration.worker.kit import WorkerUnderTest, request, worker_settings
from tests.kit.waits import wait_until

STALLED = 20
RSS_BOUND = 64 * 2**20


async def test_stalled_clients_do_not_hold_up_the_engine_and_memory_stays_bounded(
    tmp_path: Path, tiny_llama_dir: Path
) -> None:
    worker = await WorkerUnderTest.start(
        worker_settings(tmp_path, tiny_llama_dir, stream_buffer_tokens=64, kv_cache_bytes=1 << 24)
    )
    me = psutil.Process()
    try:
        rss_before = me.memory_info().rss
        # logprobs make each chunk larger, so the HTTP/2 window fills and the server's writes stall.
        messages = [request([1 + i, 2, 3], max_new_tokens=3000) for i in range(STALLED)]
        for message in messages:
            message.return_logprobs = True
        calls = [worker.stub.Generate(message, timeout=260) for message in messages]
        engine = worker.worker.engine
        assert engine is not None
        await wait_until(
            lambda: (s := engine.stats()) is not None and s.num_running > 0, 30, "the stalled requests to run"
        )
        # 60,000 tokens: ~80 s on a quiet 2-core AVX2 host, so the limit leaves room for a busy one.
        await wait_until(
            lambda: (s := engine.stats()) is not None and s.num_running == s.num_waiting == 0,
            200,
            "every stalled request generated",
        )
        rss_growth = me.memory_info().rss - rss_before
        assert rss_growth < RSS_BOUND, f"the worker grew by {rss_growth / 2**20:.0f} MiB"
        for call in calls:  # nothing was lost meanwhile: each stalled client gets its whole output
            got = [t async for chunk in call for t in chunk.token_ids]
            assert len(got) == 3000
        # A reading client is served as usual afterwards.
        chunks = [c async for c in worker.stub.Generate(request([5, 6], max_new_tokens=8), timeout=60)]
        assert sum(len(c.token_ids) for c in chunks) == 8
    finally:
        await worker.stop()
