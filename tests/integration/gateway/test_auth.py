"""Authentication, tenants and limits at the gateway, in front of fake workers and a real store.

Each refusal has its own status: no or unknown key UNAUTHENTICATED, a revoked key PERMISSION_DENIED,
another tenant's private adapter NOT_FOUND (like a missing one), a limit RESOURCE_EXHAUSTED with a
RetryInfo hint.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import grpc
import pytest
from openlora.v1 import inference_pb2

from tests.integration.gateway.conftest import PRIVATE_ADAPTER, StoreUnderTest
from tests.integration.gateway.kit import (
    ACME_KEY,
    GLOBEX_KEY,
    REVOKED_KEY,
    GatewayUnderTest,
    InProcessWorkers,
    auth,
    gateway_settings,
    generate,
    generate_request,
    retry_delay_s,
    write_keys,
)
from tests.kit.waits import wait_until


async def start(
    tmp_path: Path, workers: InProcessWorkers, store: StoreUnderTest, **overrides: object
) -> GatewayUnderTest:
    settings = gateway_settings(tmp_path, workers.addresses, store_address=store.address, **overrides)
    return await GatewayUnderTest.start(settings, wait_workers=len(workers.addresses))


async def refused(gateway: GatewayUnderTest, key: str | None, **request: object) -> grpc.aio.AioRpcError:
    metadata = [("authorization", f"Bearer {key}")] if key is not None else []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in gateway.stub.Generate(generate_request(**request), metadata=metadata, timeout=10):  # type: ignore[arg-type]
            pass
    return error.value


async def test_each_refusal_has_its_own_status(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    write_keys(tmp_path / "keys.json", {"acme": {"max_concurrent_streams": 1}})
    gateway = await start(tmp_path, fake_workers, store)
    try:
        no_key = await refused(gateway, None)
        assert no_key.code() == grpc.StatusCode.UNAUTHENTICATED and "no API key" in (no_key.details() or "")
        wrong = await refused(gateway, "olk_not-a-key")
        assert wrong.code() == grpc.StatusCode.UNAUTHENTICATED and "not recognised" in (wrong.details() or "")
        revoked = await refused(gateway, REVOKED_KEY)
        assert revoked.code() == grpc.StatusCode.PERMISSION_DENIED and "revoked" in (revoked.details() or "")

        hidden = await refused(gateway, GLOBEX_KEY, adapter=PRIVATE_ADAPTER)
        missing = await refused(gateway, GLOBEX_KEY, adapter="acme/no-such-adapter")
        assert hidden.code() == missing.code() == grpc.StatusCode.NOT_FOUND
        assert hidden.details() == f"adapter {PRIVATE_ADAPTER!r} not found"

        # acme may have one stream open: a second one while the first runs is refused, with a hint.
        first = asyncio.create_task(generate(gateway.stub, generate_request("wait:1")))
        await wait_until(lambda: sum(len(w.seen) for w in fake_workers.workers) == 1, 5, "first stream")
        limited = await refused(gateway, ACME_KEY)
        assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_delay_s(limited) == pytest.approx(1.0)
        assert (await first).tokens == 4

        # None of the refused calls reached a worker.
        assert sum(len(w.seen) for w in fake_workers.workers) == 1
        assert (
            gateway.counter(
                "openlora_gateway_requests_total", tenant="-", method="Generate", code="UNAUTHENTICATED"
            )
            == 2
        )
        assert (
            gateway.counter(
                "openlora_gateway_requests_total", tenant="globex", method="Generate", code="NOT_FOUND"
            )
            == 2
        )
    finally:
        await gateway.stop()


async def test_tokens_per_minute_are_enforced_with_a_retry_hint(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    write_keys(tmp_path / "keys.json", {"acme": {"tokens_per_minute": 60}})
    gateway = await start(tmp_path, fake_workers, store)
    try:
        # 2 prompt words + 70 completion tokens overdraw the 60-token bucket by 12 tokens.
        done = await generate(gateway.stub, generate_request("two words", max_new_tokens=70))
        assert done.tokens == 70
        limited = await refused(gateway, ACME_KEY)
        assert limited.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens per minute" in (limited.details() or "")
        delay = retry_delay_s(limited)
        assert delay is not None and 12 < delay < 14  # 13 tokens at one token per second
        await generate(gateway.stub, generate_request(), key=GLOBEX_KEY)  # other tenants unaffected
    finally:
        await gateway.stop()


async def test_a_key_revoked_in_the_file_stops_working_without_a_restart(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    keys = write_keys(tmp_path / "keys.json")
    gateway = await start(tmp_path, fake_workers, store, api_keys_reload_s=0.1)
    try:
        await generate(gateway.stub, generate_request(), key=GLOBEX_KEY)
        document = json.loads(keys.read_text())
        for entry in document["keys"]:
            if entry["tenant"] == "globex":
                entry["revoked"] = True
        keys.write_text(json.dumps(document))
        os.utime(keys, ns=(1, 1))  # a new modification time whatever the file system's resolution
        await asyncio.sleep(0.2)
        revoked = await refused(gateway, GLOBEX_KEY)
        assert revoked.code() == grpc.StatusCode.PERMISSION_DENIED
        await generate(gateway.stub, generate_request(), key=ACME_KEY)  # other keys unaffected
    finally:
        await gateway.stop()


async def test_a_key_revoked_mid_stream_ends_its_open_streams(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> None:
    """A stream opened before its key was revoked stops within about a second of the revocation,
    PERMISSION_DENIED, instead of running to its end."""
    keys = write_keys(tmp_path / "keys.json")
    for worker in fake_workers.workers:
        worker.delay_s = 0.05  # 200 tokens: ten seconds if nothing stops it
    gateway = await start(tmp_path, fake_workers, store, api_keys_reload_s=0.1)
    try:
        call = gateway.stub.Generate(
            generate_request(max_new_tokens=200), metadata=auth(GLOBEX_KEY), timeout=30
        )
        first = await call.read()
        assert first is not grpc.aio.EOF
        document = json.loads(keys.read_text())
        for entry in document["keys"]:
            if entry["tenant"] == "globex":
                entry["revoked"] = True
        keys.write_text(json.dumps(document))
        os.utime(keys, ns=(3, 3))
        received = 1
        with pytest.raises(grpc.aio.AioRpcError) as stopped:
            while (chunk := await call.read()) is not grpc.aio.EOF:
                assert isinstance(chunk, inference_pb2.GenerateChunk)
                received += len(chunk.token_ids)
        assert stopped.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert received < 100, received
        await wait_until(
            lambda: sum(w.cancelled for w in fake_workers.workers) == 1, 5, "the worker's stream"
        )
    finally:
        await gateway.stop()
