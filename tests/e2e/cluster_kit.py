"""`openlora up`'s cluster for end-to-end tests: real processes, driven from a background event loop
(the supervisor pumps the children's logs there while the tests run blocking clients)."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from services.cluster.up import Cluster, ClusterConfig, start_cluster

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
