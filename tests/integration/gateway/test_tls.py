"""TLS on both sides of the gateway: clients to the gateway, and mutual TLS from the gateway to workers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from openlora.v1 import inference_pb2_grpc

from services.common.grpc_client import channel_credentials, open_channel
from services.gateway.app import GatewayApp
from tests.integration.gateway.fake_worker import FakeWorker, fake_worker_server
from tests.integration.gateway.kit import gateway_settings, generate, generate_request
from tests.kit.certs import make_certs
from tests.kit.waits import wait_until


async def test_tls_to_clients_and_mutual_tls_to_workers(tmp_path: Path) -> None:
    certs = make_certs(tmp_path)
    worker = fake_worker_server(
        FakeWorker("secure"),
        tls_cert_file=certs.server_cert,
        tls_key_file=certs.server_key,
        tls_client_ca_file=certs.ca,  # the worker only talks to holders of a client certificate
    )
    worker_port = await worker.start()
    tls = {"tls_cert_file": certs.server_cert, "tls_key_file": certs.server_key}
    upstream = {"upstream_tls_ca_file": certs.ca}
    with_cert = {"upstream_tls_cert_file": certs.client_cert, "upstream_tls_key_file": certs.client_key}
    address = [f"localhost:{worker_port}"]
    good = GatewayApp(gateway_settings(tmp_path, address, **tls, **upstream, **with_cert))
    (tmp_path / "no-cert").mkdir()
    no_cert = GatewayApp(gateway_settings(tmp_path / "no-cert", address, **upstream))
    try:
        good_port, no_cert_port = await good.start(), await no_cert.start()
        await wait_until(lambda: len(good.pool.healthy_loads()) == 1, 20, "the worker over mTLS")
        async with open_channel(
            f"localhost:{good_port}", credentials=channel_credentials(certs.ca)
        ) as channel:
            result = await generate(inference_pb2_grpc.InferenceStub(channel), generate_request())
        assert result.served_by == {"secure"}

        # Without a client certificate the worker refuses the gateway: never in rotation.
        await asyncio.sleep(0.5)  # several health-watch attempts (retry every 0.2 s)
        assert not no_cert.pool.healthy_loads()
        async with open_channel(f"127.0.0.1:{no_cert_port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await generate(inference_pb2_grpc.InferenceStub(channel), generate_request())
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no inference worker" in (error.value.details() or "")
    finally:
        await good.stop()
        await no_cert.stop()
        await worker.stop()
