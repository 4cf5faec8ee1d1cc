"""`openlora up --tls`: every hop over mutual TLS (real processes, tiny model), driven like a tenant
and an operator would, and no service reachable in plaintext or without a certificate."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from openlora import Client
from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, attribution_pb2, attribution_pb2_grpc

from services.cluster.synthetic_adapters import write_adapter
from services.cluster.up import Cluster, ClusterConfig
from services.common.grpc_client import channel_credentials, health_status, open_channel
from services.common.trust.setup import operator_identity
from tests.e2e.cluster_kit import running_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = "tls"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    config = ClusterConfig(
        data_dir=tmp_path_factory.mktemp("cluster"),
        model="tiny",
        gateway_port=0,
        http_port=0,
        tenant=TENANT,
        tls=True,
    )
    with running_cluster(config, {}) as (running, _logs):
        assert running.tls is not None and running.tls.ca_file is not None
        yield running


async def upload_adapter(cluster: Cluster, folder: Path) -> None:
    """Through the gateway, over TLS, with the tenant's API key (the gateway → store hop is mTLS)."""
    assert cluster.tls is not None
    config = json.loads((cluster.model_dir / "config.json").read_text())
    path = write_adapter(folder, config, rank=4, targets=["q_proj", "v_proj"], seed=7, std=0.1)
    header = store_pb.UploadHeader(id=f"{TENANT}/secure", base_model=cluster.base_model)
    credentials = channel_credentials(cluster.tls.ca_file)
    async with grpc.aio.secure_channel(cluster.gateway, credentials) as channel:
        auth = (("authorization", f"Bearer {cluster.api_key}"),)
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        await upload(stub, header, adapter_files(path), timeout=60, metadata=auth)


async def ledger_completion_tokens(cluster: Cluster) -> int:
    """What attribution holds for the tenant, asked as the operator (certificate CN `operator`)."""
    identity = operator_identity(cluster.secret_file)
    async with open_channel(
        cluster.attribution, tls=cluster.tls, identity=identity, audience="attribution"
    ) as channel:
        report = await attribution_pb2_grpc.AttributionStub(channel).GetUsage(
            attribution_pb2.UsageQuery(tenant=TENANT), timeout=10
        )
    return int(report.totals.completion_tokens)


def test_a_tenant_is_served_and_billed_with_tls_on_every_hop(cluster: Cluster, tmp_path: Path) -> None:
    assert cluster.tls is not None
    asyncio.run(upload_adapter(cluster, tmp_path / "adapter"))  # client → gateway → store
    with Client(cluster.gateway, api_key=cluster.api_key, ca_file=cluster.tls.ca_file) as client:
        # gateway → worker → store (the adapter's download) → attribution (its usage)
        completion = client.generate(
            "over tls", adapter=f"{TENANT}/secure", max_new_tokens=6, ignore_eos=True
        )
    assert completion.completion_tokens == len(completion.token_ids) == 6
    deadline = time.monotonic() + 30
    while (billed := asyncio.run(ledger_completion_tokens(cluster))) != 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert billed == 6


@pytest.mark.parametrize("service", ["store", "attribution", "worker", "gateway"])
def test_no_service_answers_in_plaintext_or_to_a_stranger_without_a_certificate(
    cluster: Cluster, service: str
) -> None:
    assert cluster.tls is not None
    address = {"store": cluster.store, "attribution": cluster.attribution, "gateway": cluster.gateway}.get(
        service, cluster.workers[0]
    )

    async def probe(credentials: grpc.ChannelCredentials | None) -> str:
        async with open_channel(address, credentials=credentials) as channel:
            try:
                return await health_status(channel, timeout=3)
            except grpc.aio.AioRpcError as exc:
                return exc.code().name

    assert asyncio.run(probe(None)) == "UNAVAILABLE"  # plaintext: no TLS handshake, no answer
    without_certificate = asyncio.run(probe(channel_credentials(cluster.tls.ca_file)))
    # The gateway's clients authenticate with API keys; everything behind it wants a certificate.
    assert without_certificate == ("SERVING" if service == "gateway" else "UNAVAILABLE")
    assert asyncio.run(probe(cluster.tls.credentials())) == "SERVING"


def test_the_adapters_cli_reaches_the_store_through_the_gateway_with_an_api_key(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The documented tenant workflow: `openlora adapters … --api-key … --ca-file …` against the gateway."""
    assert cluster.tls is not None and cluster.tls.ca_file is not None
    asyncio.run(upload_adapter(cluster, tmp_path / "adapter"))
    # A tenant's environment: an API key, not the operator's secret.
    env = {k: v for k, v in os.environ.items() if k != "OPENLORA_SERVICE_SECRET_FILE"}
    command = [sys.executable, "-m", "services.cli", "adapters", "list", "--store", cluster.gateway]
    command += ["--ca-file", str(cluster.tls.ca_file)]

    def adapters_list(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=env | extra, capture_output=True, text=True, timeout=60)

    listed = adapters_list(OPENLORA_API_KEY=cluster.api_key)
    assert listed.returncode == 0, listed.stderr
    assert f"{TENANT}/secure" in listed.stdout
    # Without the key the gateway refuses, and says how to authenticate.
    refused = adapters_list()
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr


def test_openlora_health_probes_a_mutual_tls_service(cluster: Cluster) -> None:
    """What the Kubernetes mTLS overlay's exec probes run."""
    assert cluster.tls is not None and cluster.tls.ca_file and cluster.tls.cert_file and cluster.tls.key_file
    command = [
        sys.executable,
        "-m",
        "services.cli",
        "health",
        cluster.store,
        "--ca-file",
        str(cluster.tls.ca_file),
    ]
    with_certificate = [
        *command,
        "--cert-file",
        str(cluster.tls.cert_file),
        "--key-file",
        str(cluster.tls.key_file),
    ]
    serving = subprocess.run(with_certificate, capture_output=True, text=True, timeout=60)
    assert (serving.returncode, serving.stdout.strip()) == (0, "SERVING"), serving.stderr
    refused = subprocess.run([*command, "--timeout", "2"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and refused.stdout.startswith("UNAVAILABLE")
