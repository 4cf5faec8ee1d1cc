"""The Python client against a real gRPC server (the scripted `Inference` service): streaming, retries
only before the first chunk, errors with their status and details, cancellation, both flavours."""

from __future__ import annotations

import asyncio
import os
import sys
from asyncio.subprocess import PIPE
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from openlora import (
    AsyncClient,
    Client,
    MixComponent,
    OpenLoRAError,
    RetryPolicy,
    build_request,
    parse_mix,
)
from openlora.v1 import common_pb2, inference_pb2

from services.common.errors import Unavailable
from services.common.grpc_server import GrpcServer
from services.common.settings import ServiceSettings
from tests.kit.certs import make_certs
from tests.kit.scripted_inference import ScriptedInference, binding
from tests.kit.waits import within

FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.01)


class FlakyInference(ScriptedInference):
    """Refuses the first `refuse` calls with UNAVAILABLE; with `break_after_first`, every call dies after
    its first chunk, as a worker killed mid-stream would."""

    def __init__(self, delay_s: float = 0.0) -> None:
        super().__init__(delay_s)
        self.refuse = 0
        self.break_after_first = False
        self.calls = 0
        self.authorization: list[str | None] = []

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        self.calls += 1
        self.authorization.append(dict(context.invocation_metadata()).get("authorization"))
        if self.calls <= self.refuse:
            raise Unavailable("worker draining", retry_after_s=0.02)
        async for chunk in super().Generate(request, context):
            yield chunk
            if self.break_after_first:
                raise Unavailable("worker lost")


@pytest.fixture
async def server() -> AsyncIterator[tuple[FlakyInference, str]]:
    servicer = FlakyInference()
    kit = GrpcServer(ServiceSettings(port=0), [binding(servicer)], component="scripted")
    port = await kit.start()
    await kit.set_ready(True)
    yield servicer, f"127.0.0.1:{port}"
    await kit.stop()


async def test_a_stream_yields_chunks_and_a_completion_adds_them_up(
    server: tuple[FlakyInference, str],
) -> None:
    servicer, target = server
    async with AsyncClient(target, api_key="olk_test") as client:
        chunks = [c async for c in client.stream("two words", max_new_tokens=3, request_id="req-1")]
        completion = await client.generate("two words", max_new_tokens=2)
    assert [c.text for c in chunks] == ["t0 ", "t1 ", "t2 ", ""]
    assert chunks[-1].finish_reason == "length" and chunks[-1].completion_tokens == 3
    assert (completion.text, completion.token_ids, completion.finish_reason) == ("t0 t1 ", [0, 1], "length")
    assert (completion.prompt_tokens, completion.completion_tokens) == (2, 2)
    assert servicer.seen_request_ids[0] == "req-1" and servicer.seen_request_ids[1] == completion.request_id
    assert servicer.authorization == ["Bearer olk_test", "Bearer olk_test"]


async def test_unavailable_before_the_first_chunk_is_retried(server: tuple[FlakyInference, str]) -> None:
    servicer, target = server
    servicer.refuse = 2
    async with AsyncClient(target, retry=FAST_RETRY) as client:
        completion = await client.generate("hello", max_new_tokens=2)
    assert completion.text == "t0 t1 " and servicer.calls == 3
    assert len(set(servicer.seen_request_ids)) == 1  # every attempt carries the same request id


async def test_retries_are_bounded(server: tuple[FlakyInference, str]) -> None:
    servicer, target = server
    servicer.refuse = 10
    async with AsyncClient(target, retry=FAST_RETRY) as client:
        with pytest.raises(OpenLoRAError) as failed:
            await client.generate("hello")
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and servicer.calls == 3
    assert failed.value.retry_after_s == pytest.approx(0.02)


async def test_a_stream_that_already_produced_tokens_is_not_retried(
    server: tuple[FlakyInference, str],
) -> None:
    servicer, target = server
    servicer.break_after_first = True
    received = []
    async with AsyncClient(target, retry=FAST_RETRY) as client:
        with pytest.raises(OpenLoRAError) as failed:
            async for chunk in client.stream("hello", max_new_tokens=5):
                received.append(chunk.text)
    assert received == ["t0 "] and servicer.calls == 1
    assert failed.value.code == grpc.StatusCode.UNAVAILABLE and failed.value.request_id


async def test_invalid_arguments_name_the_field_and_are_not_retried(
    server: tuple[FlakyInference, str],
) -> None:
    servicer, target = server
    async with AsyncClient(target, retry=FAST_RETRY) as client:
        with pytest.raises(OpenLoRAError) as failed:
            await client.generate("", request_id="bad-1")
    error = failed.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.field_violations == {
        "text": "must not be empty"
    }
    assert error.request_id == "bad-1" and servicer.calls == 1
    assert "INVALID_ARGUMENT" in str(error) and "bad-1" in str(error)


async def test_leaving_a_stream_early_cancels_the_call(server: tuple[FlakyInference, str]) -> None:
    servicer, target = server
    servicer.delay_s = 0.05
    async with AsyncClient(target) as client:
        async for _ in client.stream("hello", max_new_tokens=100):
            break
        await within(servicer.cancelled.wait(), timeout=5)


async def test_the_blocking_client_behaves_the_same(server: tuple[FlakyInference, str]) -> None:
    servicer, target = server
    servicer.refuse = 1

    def run() -> tuple[str, str]:
        with Client(target, api_key="olk_sync", retry=FAST_RETRY) as client:
            text = client.generate("hi", max_new_tokens=2).text
            try:
                client.generate("")
            except OpenLoRAError as exc:
                return text, exc.code.name
        return text, "no error"

    # The server runs on this event loop: the blocking client must run on another thread.
    assert await asyncio.to_thread(run) == ("t0 t1 ", "INVALID_ARGUMENT")
    assert servicer.authorization[-1] == "Bearer olk_sync"


def test_requests_carry_adapters_mixes_and_sampling() -> None:
    request = build_request("hi", adapter="acme/poet@v2", max_new_tokens=7, temperature=0.5, stop=["\n"])
    assert (request.adapter_ref.id, request.adapter_ref.version) == ("acme/poet", "v2")
    assert request.sampling.max_new_tokens == 7 and list(request.sampling.stop) == ["\n"]
    assert build_request("hi", adapter="hf://org/repo@main").adapter_ref.id == "hf://org/repo@main"
    mixed = build_request([1, 2, 3], mix=parse_mix("poet:0.7, coder@v1:0.3"), strategy="ties", density=0.5)
    assert list(mixed.token_ids.ids) == [1, 2, 3] and mixed.mix.strategy == common_pb2.TIES
    assert [(c.adapter.id, c.adapter.version, round(c.weight, 3)) for c in mixed.mix.components] == [
        ("poet", "", 0.7),
        ("coder", "v1", 0.3),
    ]
    assert parse_mix("a:1") == [MixComponent("a", 1.0)]
    for bad in ("", "a", "a:x", ":1"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    with pytest.raises(ValueError, match="either adapter or mix"):
        build_request("hi", adapter="a", mix=[MixComponent("b", 1.0)])
    with pytest.raises(ValueError, match="unknown strategy"):
        build_request("hi", mix=[MixComponent("b", 1.0)], strategy="magic")


async def test_tls_without_a_ca_file_trusts_the_system_roots(tmp_path: Path) -> None:
    """`OPENLORA_TLS=1` and no CA file: the client verifies the server against the roots gRPC trusts by
    default. The test makes its own CA those roots (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH, read by gRPC's
    core in a fresh process) and reads target and key from the environment as a deployment would."""
    certs = make_certs(tmp_path / "tls")
    settings = ServiceSettings(port=0, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key)
    servicer = FlakyInference()
    kit = GrpcServer(settings, [binding(servicer)], component="scripted")
    port = await kit.start()
    await kit.set_ready(True)
    script = "from openlora import Client\nprint(Client().generate('over tls', max_new_tokens=2).text)"
    env = {
        **os.environ,
        "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(certs.ca),
        "OPENLORA_TLS": "1",
        "OPENLORA_TARGET": f"localhost:{port}",
        "OPENLORA_API_KEY": "olk_from_env",
    }
    env.pop("OPENLORA_CA_FILE", None)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, env=env, stdout=PIPE, stderr=PIPE
        )
        out, err = await within(process.communicate(), 60)
    finally:
        await kit.stop()
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "t0 t1"
    assert servicer.authorization == ["Bearer olk_from_env"]
