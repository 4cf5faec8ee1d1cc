"""`openlora up`'s cluster for end-to-end tests: real processes, driven from a background event loop
(the supervisor pumps the children's logs there while the tests run blocking clients)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc

from services.cluster.synthetic_adapters import write_adapter
from services.cluster.up import Cluster, ClusterConfig, start_cluster
from services.common.trust.setup import operator_identity
from tests.kit.work_clock import WorkDeadline

T = TypeVar("T")


class BackgroundLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 600) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def running_cluster(config: ClusterConfig, env: Mapping[str, str]) -> Iterator[tuple[Cluster, io.StringIO]]:
    """The cluster with `env` in its children's environment; yields it and its captured logs."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the children inherit this process's environment
    logs = io.StringIO()
    background = BackgroundLoop()
    try:
        cluster = background.run(start_cluster(config, lambda text: None, logs))
        try:
            yield cluster, logs
        finally:
            background.run(cluster.supervisor.stop())
    finally:
        background.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def upload_adapter(
    cluster: Cluster, name: str, seed: int, folder: Path, chat_template: str | None = None
) -> None:
    """Through the gateway's store API, as the tenant: trainer 70%, data contributor 30% (with the
    adapter's own chat template when given)."""
    config = json.loads((cluster.model_dir / "config.json").read_text())
    path = write_adapter(folder, config, rank=4, targets=["q_proj", "v_proj"], seed=seed, std=0.1)
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(chat_template)
    header = store_pb.UploadHeader(
        id=f"{cluster.tenant}/{name}",
        visibility=store_pb.PRIVATE,
        base_model=cluster.base_model,
        provenance=store_pb.Provenance(
            trainer=f"{name}-trainer",
            datasets=[f"{name}-data"],
            contributors=[
                store_pb.Contributor(id=f"{name}-trainer", role=store_pb.TRAINER, share=0.7),
                store_pb.Contributor(id=f"{name}-data", role=store_pb.DATA, share=0.3),
            ],
        ),
    )
    async with grpc.aio.insecure_channel(cluster.gateway) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        auth = (("authorization", f"Bearer {cluster.api_key}"),)
        info = await upload(stub, header, adapter_files(path), timeout=60, metadata=auth)
    assert info.owner == cluster.tenant


def eventually(probe: Callable[[], T | None], timeout_s: float = 30.0) -> T:
    """`probe`'s first value that is not None, within `timeout_s` of work (see `work_clock.py`)."""
    deadline = WorkDeadline(timeout_s)
    while True:
        value = probe()
        if value is not None:
            return value
        if deadline.expired():
            raise AssertionError(f"condition not met within {deadline.describe()}")
        time.sleep(0.25)


def operator(cluster: Cluster, audience: str) -> tuple[tuple[str, str]]:
    """Metadata of a call an operator makes to `audience`, signed with the cluster's own secret."""
    identity = operator_identity(cluster.secret_file)
    assert identity is not None
    return (identity.metadata(audience),)


def steady(
    probe: Callable[[], T], ready: Callable[[T], bool], quiet_s: float = 2.0, timeout_s: float = 60.0
) -> T:
    """`probe`'s value once `ready` holds for it and it has not changed for `quiet_s`, within
    `timeout_s` of work (see `work_clock.py`)."""
    deadline = WorkDeadline(timeout_s)
    last, since = probe(), time.monotonic()
    while not deadline.expired():
        time.sleep(0.25)
        value = probe()
        if value != last or not ready(value):
            last, since = value, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return value
    raise AssertionError(f"not settled within {deadline.describe()}; last: {last}")
