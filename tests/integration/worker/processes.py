"""Real service processes for the worker's acceptance tests: `openlora <service> serve` in a subprocess.

Each process logs to a file under the test's tmp_path (read it when a test fails), is ready once its
health service reports SERVING, and is stopped with SIGTERM (drain) or SIGKILL (crash) by the test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.common.grpc_client import health_status, open_channel
from services.common.trust.roles import GATEWAY
from tests.kit.ports import free_port
from tests.kit.seaweedfs import S3Endpoint
from tests.kit.service_auth import as_role

ROOT = Path(__file__).resolve().parents[3]
OPENLORA = str(Path(sys.executable).parent / "openlora")


@dataclass
class ServiceProcess:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ServiceProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115  (the child holds it for its lifetime)
        self.process = subprocess.Popen(
            self.argv, cwd=ROOT, env={**os.environ, **self.env}, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        return self

    async def wait_ready(self, timeout_s: float = 120.0) -> None:
        assert self.process is not None
        deadline = asyncio.get_running_loop().time() + timeout_s
        async with open_channel(f"127.0.0.1:{self.port}", **as_role(GATEWAY, "worker")) as channel:
            while asyncio.get_running_loop().time() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(
                        f"{self.name} exited ({self.process.returncode}):\n{self.log_tail()}"
                    )
                try:
                    if await health_status(channel, timeout=1) == "SERVING":
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not ready within {timeout_s:g}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: a crash, nothing flushed or drained."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def terminate(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def store_process(tmp_path: Path, s3: S3Endpoint) -> ServiceProcess:
    port = free_port()
    env = {
        "OPENLORA_STORE_BACKEND": "s3",
        "OPENLORA_STORE_S3_ENDPOINT_URL": s3.endpoint_url,
        "OPENLORA_STORE_S3_BUCKET": f"worker-{uuid.uuid4().hex[:10]}",
        "OPENLORA_STORE_S3_ACCESS_KEY_ID": s3.access_key,
        "OPENLORA_STORE_S3_SECRET_ACCESS_KEY": s3.secret_key,
        "OPENLORA_STORE_MAX_RANK": "64",
        "OPENLORA_STORE_LOG_LEVEL": "WARNING",
    }
    return ServiceProcess(
        "store", [OPENLORA, "store", "serve", "--port", str(port)], env, tmp_path / "store.log", port
    )


def attribution_process(tmp_path: Path, database_url: str, port: int | None = None) -> ServiceProcess:
    port = port or free_port()
    argv = [OPENLORA, "attribution", "serve", "--port", str(port), "--database-url", database_url]
    env = {"OPENLORA_ATTRIBUTION_LOG_LEVEL": "WARNING", "OPENLORA_ATTRIBUTION_GRACE_PERIOD_S": "2"}
    return ServiceProcess("attribution", argv, env, tmp_path / "attribution.log", port)


def worker_process(
    tmp_path: Path,
    model: Path,
    *,
    store_port: int,
    attribution_port: int,
    port: int | None = None,
    metrics_port: int | None = None,
    extra_env: dict[str, Any] | None = None,
) -> ServiceProcess:
    port = port or free_port()
    argv = [
        OPENLORA,
        "worker",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--store-address",
        f"127.0.0.1:{store_port}",
        "--attribution-address",
        f"127.0.0.1:{attribution_port}",
        "--metrics-port",
        str(metrics_port or free_port()),
        "--spool-dir",
        str(tmp_path / "spool"),
        "--cache-dir",
        str(tmp_path / "adapter-cache"),
    ]
    env = {
        "OPENLORA_WORKER_WORKER_ID": "worker-proc",
        "OPENLORA_WORKER_DTYPE": "float32",  # the references (`reference_outputs`) run in float32
        "OPENLORA_WORKER_KV_CACHE_BYTES": str(1 << 24),
        "OPENLORA_WORKER_LORA_SLOTS": "8",
        "OPENLORA_WORKER_LORA_MAX_RANK": "16",
        "OPENLORA_WORKER_LORA_TARGET_MODULES": json.dumps(["q_proj", "v_proj"]),
        "OPENLORA_WORKER_USAGE_BACKOFF_MAX_S": "1",
        "OPENLORA_WORKER_LOG_LEVEL": "WARNING",
        "OPENLORA_WORKER_GRACE_PERIOD_S": "5",
        **{k: str(v) for k, v in (extra_env or {}).items()},
    }
    return ServiceProcess("worker", argv, env, tmp_path / "worker.log", port)


def total(counts: dict[Any, int], keys: Sequence[Any] | None = None) -> int:
    return sum(counts.values()) if keys is None else sum(counts.get(k, 0) for k in keys)
