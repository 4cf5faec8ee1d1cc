"""The gateway's HTTP API against stand-in workers: every refusal is an OpenAI error object with the
status and headers a client acts on (401, 403, 404, 400 naming the parameter, 429 and 503 with
`Retry-After`), an error after the stream began is an SSE error event, and a client that hangs up
(streaming or not) cancels the worker's stream."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from tests.integration.gateway.conftest import PRIVATE_ADAPTER, StoreUnderTest
from tests.integration.gateway.kit import (
    ACME_KEY,
    GLOBEX_KEY,
    REVOKED_KEY,
    GatewayUnderTest,
    InProcessWorkers,
    gateway_settings,
    write_keys,
)
from tests.kit.waits import wait_until


@pytest.fixture
async def gateway(
    tmp_path: Path, fake_workers: InProcessWorkers, store: StoreUnderTest
) -> AsyncIterator[GatewayUnderTest]:
    write_keys(tmp_path / "keys.json", {"acme": {"tokens_per_minute": 60}})
    settings = gateway_settings(tmp_path, fake_workers.addresses, store_address=store.address, http_port=0)
    gateway = await GatewayUnderTest.start(settings, wait_workers=len(fake_workers.addresses))
    yield gateway
    await gateway.stop()


def sdk(gateway: GatewayUnderTest, key: str = GLOBEX_KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gateway.gateway.http_port}/v1", api_key=key, max_retries=0
    )


async def complete(gateway: GatewayUnderTest, prompt: str, key: str = GLOBEX_KEY, **body: object) -> str:
    async with sdk(gateway, key) as client:
        reply = await client.completions.create(model="fake", prompt=prompt, **body)  # type: ignore[call-overload]
        return str(reply.choices[0].text)


async def test_a_valid_key_is_served_and_others_are_refused(
    gateway: GatewayUnderTest, fake_workers: InProcessWorkers
) -> None:
    with pytest.raises(openai.AuthenticationError) as unknown:
        await complete(gateway, "hi", key="olk_nobody")
    assert unknown.value.status_code == 401
    with pytest.raises(openai.PermissionDeniedError):
        await complete(gateway, "hi", key=REVOKED_KEY)
    served = await complete(gateway, "hi", max_tokens=4)  # each token the serving worker's name
    assert served in {w.name * 4 for w in fake_workers.workers}


async def test_another_tenants_private_adapter_is_not_found(gateway: GatewayUnderTest) -> None:
    async with sdk(gateway) as client:
        with pytest.raises(openai.NotFoundError) as hidden:
            await client.completions.create(model=PRIVATE_ADAPTER, prompt="hi")
        assert hidden.value.body == {
            "message": f"adapter {PRIVATE_ADAPTER!r} not found",
            "type": "not_found_error",
            "param": None,
            "code": "not_found",
        }
        ids = {model.id async for model in client.models.list()}
    assert "fake" in ids and PRIVATE_ADAPTER not in ids
    async with sdk(gateway, ACME_KEY) as owner:
        assert PRIVATE_ADAPTER in {model.id async for model in owner.models.list()}


async def test_a_workers_refusal_names_the_http_parameter(gateway: GatewayUnderTest) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        await complete(gateway, "invalid")
    assert refused.value.body == {
        "message": "prompt: refused by the worker",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_argument",
    }
    assert refused.value.response.headers["x-request-id"]


async def test_limits_and_outages_say_when_to_retry(gateway: GatewayUnderTest) -> None:
    await complete(gateway, "two words", key=ACME_KEY, max_tokens=70)  # overdraws the 60-token bucket
    with pytest.raises(openai.RateLimitError) as limited:
        await complete(gateway, "again", key=ACME_KEY)
    assert 12 <= int(limited.value.response.headers["retry-after"]) <= 14
    with pytest.raises(openai.InternalServerError) as down:
        await complete(gateway, "unavailable")
    # Every worker answered UNAVAILABLE: the gateway's own retry hint, after trying each of them.
    assert down.value.status_code == 503 and down.value.response.headers["retry-after"] == "1"


async def raw_request(
    gateway: GatewayUnderTest, body: dict[str, object]
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = gateway.gateway.http_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {GLOBEX_KEY}\r\ncontent-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    await writer.drain()
    return reader, writer


@pytest.mark.parametrize("stream", [False, True])
async def test_a_client_that_hangs_up_cancels_the_workers_stream(
    gateway: GatewayUnderTest, fake_workers: InProcessWorkers, stream: bool
) -> None:
    before = sum(w.cancelled for w in fake_workers.workers)
    # Streaming: the first token comes at once, then one every 0.5 s; whole: nothing for 5 s.
    prompt = "slow" if stream else "wait:5"
    for worker in fake_workers.workers:
        worker.delay_s = 0.5
    reader, writer = await raw_request(
        gateway, {"model": "fake", "prompt": prompt, "max_tokens": 50, "stream": stream}
    )
    if stream:
        assert b"200 OK" in await reader.readuntil(b"\r\n\r\n")
        assert b"data: " in await reader.readuntil(b"\n\n")
    else:
        await asyncio.sleep(0.3)
    writer.close()
    await wait_until(
        lambda: sum(w.cancelled for w in fake_workers.workers) == before + 1,
        5,
        "the worker's stream cancelled",
    )


async def test_health_follows_the_workers(gateway: GatewayUnderTest) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gateway.http_port)
    writer.write(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
    await writer.drain()
    assert b"200 OK" in await reader.readuntil(b"\r\n\r\n")
    writer.close()


async def test_kept_alive_connections_do_not_wait_for_delayed_acks(gateway: GatewayUnderTest) -> None:
    """Nagle's algorithm off on every accepted connection: asyncio only turns it off on sockets that
    say they are TCP, and an SSE stream's small writes would each wait ~40 ms for the client's ACK."""
    http = gateway.gateway.http
    assert http is not None and http._socket is not None
    assert http._socket.proto == socket.IPPROTO_TCP
    assert http._socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
