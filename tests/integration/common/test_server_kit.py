"""The gRPC server kit, exercised through real channels on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.common.grpc_client import channel_credentials, health_status, open_channel, reflected_services
from services.common.grpc_server import GrpcServer
from services.common.settings import ServiceSettings
from tests.kit.certs import make_certs
from tests.kit.scripted_inference import SECRET, ScriptedInference, binding
from tests.kit.waits import within


def settings(**overrides: object) -> ServiceSettings:
    return ServiceSettings(**{"port": 0, **overrides})  # type: ignore[arg-type]


async def started(servicer: ScriptedInference, **kwargs: object) -> GrpcServer:
    server = GrpcServer(kwargs.pop("settings", settings()), [binding(servicer)], component="test", **kwargs)  # type: ignore[arg-type]
    await server.start()
    return server


@pytest.fixture
async def server() -> AsyncIterator[tuple[GrpcServer, ScriptedInference]]:
    servicer = ScriptedInference()
    srv = await started(servicer)
    yield srv, servicer
    await srv.stop()


def generate(text: str, tokens: int = 3) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(text=text, sampling=common_pb2.SamplingParams(max_new_tokens=tokens))


async def failed_generate(port: int | None, text: str) -> grpc.aio.AioRpcError:
    """The error a Generate stream ends with (the test fails if it ends cleanly)."""
    async with open_channel(f"127.0.0.1:{port}") as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(generate(text))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    return caught.value


async def test_health_serving_and_reflection(server: tuple[GrpcServer, ScriptedInference]) -> None:
    srv, _ = server
    async with open_channel(f"127.0.0.1:{srv.port}") as channel:
        assert await health_status(channel) == "SERVING"
        assert await health_status(channel, "openlora.v1.Inference") == "SERVING"
        names = await reflected_services(channel)
    assert "openlora.v1.Inference" in names
    assert "grpc.health.v1.Health" in names


async def test_not_serving_until_ready() -> None:
    srv = await started(ScriptedInference(), ready_on_start=False)
    try:
        async with open_channel(f"127.0.0.1:{srv.port}") as channel:
            assert await health_status(channel) == "NOT_SERVING"
            await srv.set_ready(True)
            assert await health_status(channel, "openlora.v1.Inference") == "SERVING"
    finally:
        await srv.stop()


async def test_stream_and_unary_calls_succeed(server: tuple[GrpcServer, ScriptedInference]) -> None:
    srv, _ = server
    async with open_channel(f"127.0.0.1:{srv.port}") as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        chunks = [c async for c in stub.Generate(generate("two words", tokens=3))]
        models = await stub.ListModels(inference_pb2.ListModelsRequest())
    assert [c.token_ids[0] for c in chunks[:-1]] == [0, 1, 2]
    assert chunks[-1].finish_reason == inference_pb2.LENGTH
    assert chunks[-1].usage.completion_tokens == 3
    assert models.worker_id == "scripted-1"


async def test_unhandled_exception_is_internal_with_request_id_and_no_traceback(
    server: tuple[GrpcServer, ScriptedInference], caplog: pytest.LogCaptureFixture
) -> None:
    srv, _ = server
    error = await failed_generate(srv.port, "boom")
    assert error.code() == grpc.StatusCode.INTERNAL
    trailing = dict(error.trailing_metadata() or ())
    request_id = trailing["x-request-id"]
    assert len(request_id) == 32
    details = error.details() or ""
    assert request_id in details
    assert SECRET not in details and "Traceback" not in details
    assert "RuntimeError" not in details
    # The traceback is in the server's log instead, tagged with the same request id.
    assert any(SECRET in r.getMessage() + str(r.exc_info) for r in caplog.records)


async def test_service_error_maps_to_status_naming_the_field(
    server: tuple[GrpcServer, ScriptedInference],
) -> None:
    srv, _ = server
    error = await failed_generate(srv.port, "")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "text: must not be empty"
    status = rpc_status.from_call(error)
    assert status is not None
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "text"


async def test_caller_request_id_is_kept(server: tuple[GrpcServer, ScriptedInference]) -> None:
    srv, servicer = server
    async with open_channel(f"127.0.0.1:{srv.port}") as channel:
        call = inference_pb2_grpc.InferenceStub(channel).Generate(
            generate("hi", tokens=1), metadata=(("x-request-id", "req-abc-123"),)
        )
        _ = [c async for c in call]
        trailing = dict(await call.trailing_metadata() or ())
    assert trailing["x-request-id"] == "req-abc-123"
    assert servicer.seen_request_ids[-1] == "req-abc-123"


async def test_client_cancel_reaches_the_handler() -> None:
    servicer = ScriptedInference(delay_s=0.05)
    srv = await started(servicer)
    try:
        async with open_channel(f"127.0.0.1:{srv.port}") as channel:
            call = inference_pb2_grpc.InferenceStub(channel).Generate(generate("long", tokens=1000))
            await call.read()
            call.cancel()
            await within(servicer.cancelled.wait(), timeout=5)
        for _ in range(50):  # the interceptor's bookkeeping runs as the handler unwinds
            if srv.inflight.count == 0:
                break
            await asyncio.sleep(0.02)
        assert srv.inflight.count == 0
    finally:
        await srv.stop()


async def test_message_size_limit_is_enforced() -> None:
    srv = await started(ScriptedInference(), settings=settings(max_message_bytes=4096))
    try:
        error = await failed_generate(srv.port, "x" * 10_000)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await srv.stop()


async def test_port_in_use_fails_clearly() -> None:
    first = await started(ScriptedInference())
    try:
        second = GrpcServer(settings(port=first.port), [binding(ScriptedInference())], component="dup")
        with pytest.raises(OSError, match="cannot listen"):
            await second.start()
    finally:
        await first.stop()


async def test_traces_a_server_span_per_call() -> None:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    srv = await started(ScriptedInference(), tracer_provider=provider)
    try:
        async with open_channel(f"127.0.0.1:{srv.port}", tracer_provider=provider) as channel:
            await inference_pb2_grpc.InferenceStub(channel).ListModels(inference_pb2.ListModelsRequest())
    finally:
        await srv.stop()
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert "/openlora.v1.Inference/ListModels" in names
    server_span = next(s for s in spans if s.kind.name == "SERVER")
    client_span = next(s for s in spans if s.kind.name == "CLIENT")
    assert server_span.context.trace_id == client_span.context.trace_id  # context crossed the wire


async def test_tls_and_mutual_tls(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    tls = settings(tls_cert_file=certs.server_cert, tls_key_file=certs.server_key)
    srv = await started(ScriptedInference(), settings=tls)
    try:
        async with open_channel(
            f"localhost:{srv.port}", credentials=channel_credentials(certs.ca)
        ) as channel:
            assert await health_status(channel) == "SERVING"
        async with open_channel(f"127.0.0.1:{srv.port}") as plaintext:
            with pytest.raises(grpc.aio.AioRpcError):
                await health_status(plaintext, timeout=2)
    finally:
        await srv.stop()

    mtls = settings(
        tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, tls_client_ca_file=certs.ca
    )
    srv = await started(ScriptedInference(), settings=mtls)
    try:
        no_client_cert = channel_credentials(certs.ca)
        async with open_channel(f"localhost:{srv.port}", credentials=no_client_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await health_status(channel, timeout=2)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        with_cert = channel_credentials(certs.ca, certs.client_cert, certs.client_key)
        async with open_channel(f"localhost:{srv.port}", credentials=with_cert) as channel:
            assert await health_status(channel) == "SERVING"
    finally:
        await srv.stop()


async def test_bytes_that_are_not_the_message_are_invalid_argument(
    server: tuple[GrpcServer, ScriptedInference],
) -> None:
    """Not UNKNOWN ("Unexpected DecodeError") nor INTERNAL: the caller sent a malformed request."""
    srv, _ = server
    garbage = b"\xff\xff\xff\xff\x0f"
    async with open_channel(f"127.0.0.1:{srv.port}") as channel:
        unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/openlora.v1.Inference/ListModels"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await unary(garbage, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid message" in (caught.value.details() or "")
        streaming: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            "/openlora.v1.Inference/Generate"
        )
        with pytest.raises(grpc.aio.AioRpcError) as streamed:
            async for _ in streaming(garbage, timeout=10):
                pass
        assert streamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        trailers = dict(streamed.value.trailing_metadata() or ())
        assert trailers.get("x-request-id")
        # The server is unharmed: a well-formed call right after is served.
        stub = inference_pb2_grpc.InferenceStub(channel)
        assert [c async for c in stub.Generate(generate("ok"), timeout=10)]
