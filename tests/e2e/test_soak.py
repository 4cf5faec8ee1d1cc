"""R5 soak: 256 concurrent streams for two and a half minutes through the gateway (real processes,
tiny model), with eight adapters on four device slots (so adapters swap in and out all along),
two-adapter mixes and client cancellations. Asserts no error, every finished stream complete, the
resident memory of every process flat after warm-up (< 5% growth), and the worker back to zero
running requests, KV blocks and pinned slots at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from openlora import AsyncClient, MixComponent
from openlora.errors import OpenLoRAError
from openlora.retry import RetryPolicy

from services.cluster.up import Cluster, ClusterConfig
from tests.e2e.cluster_kit import running_cluster, steady, upload_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
TENANT = "soak"
ADAPTERS = [f"{TENANT}/s{i}" for i in range(8)]
STREAMS = 256
SOAK_S = 150.0
# Warm-up fills what is bounded but filled by use: allocator arenas, and the engine's oneDNN primitives
# (compiled kernels, one per matmul shape a step meets). oneDNN keeps up to 1,024 of them: in
# process, bf16 on AMX, they took the engine from 866 to 922 MiB over 80 s, but a machine with a busy
# neighbour steps slower, meets the shapes later, and was still filling the cache after 90 s (+5.2%
# in the last minute). Here the cache holds 64 (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`), full within the
# warm-up at any speed; a leak of ours still grows with every request.
ONEDNN_CACHE = 64
WARMUP_S = 75.0
WINDOW_S = 15.0  # RSS is compared as medians of the samples in a window after warm-up and at the end
MAX_GROWTH = 0.05


@dataclass
class Tally:
    finished: int = 0
    cancelled: int = 0
    mixed: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def soak_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    config = ClusterConfig(
        data_dir=tmp_path_factory.mktemp("soak"),
        model="tiny",
        gateway_port=0,
        http_port=0,
        tenant=TENANT,
        log_level="INFO",  # the worker's metrics port is read from its log
    )
    env = {
        "OPENLORA_GATEWAY_MAX_CONCURRENT_STREAMS": str(STREAMS * 2),
        "OPENLORA_WORKER_LORA_SLOTS": "4",  # fewer slots than adapters: swaps all along
        "ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(ONEDNN_CACHE),
    }
    with running_cluster(config, env) as (cluster, logs):
        for i, name in enumerate(ADAPTERS):
            folder = tmp_path_factory.mktemp(f"s{i}")
            asyncio.run(upload_adapter(cluster, name.split("/")[1], 10 + i, folder))
        ports = re.findall(r"worker-0 \|.*metrics on http://[^:]+:(\d+)/metrics", logs.getvalue())
        assert ports, "the worker logged no metrics port"
        yield cluster, f"http://127.0.0.1:{ports[-1]}/metrics"


def processes(cluster: Cluster) -> dict[str, psutil.Process]:
    """Every process of the cluster by name, the worker's engine process included."""
    found = {}
    for child in cluster.supervisor.children:
        if child.process.returncode is None:
            process = psutil.Process(child.process.pid)
            found[child.spec.name] = process
            for grandchild in process.children():
                found[f"{child.spec.name}.child{grandchild.pid}"] = grandchild
    return found


class RssSampler:
    """RSS of each process every second, on a thread of its own."""

    def __init__(self, named: dict[str, psutil.Process]) -> None:
        self.named = named
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self.started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            now = {name: p.memory_info().rss for name, p in self.named.items() if p.is_running()}
            self.samples.append((time.monotonic() - self.started, now))

    def median(self, name: str, start: float, end: float) -> float:
        return statistics.median(s[name] for t, s in self.samples if start <= t < end and name in s)


def metric(url: str, name: str, labels: str = "") -> float:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    found = re.findall(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
    assert found, f"{name}{labels} not in the worker's metrics"
    return float(found[0])


async def lane(client: AsyncClient, lane_id: int, deadline: float, tally: Tally) -> None:
    rng = random.Random(lane_id)
    n = 0
    while time.monotonic() < deadline:
        n += 1
        options: dict[str, Any] = {"max_new_tokens": rng.randint(8, 48), "ignore_eos": True}
        if n % 5 == 0:
            first, second = rng.sample(ADAPTERS, 2)
            options["mix"] = [MixComponent(first, 1.0), MixComponent(second, 0.5)]
            tally.mixed += 1
        else:
            options["adapter"] = rng.choice(ADAPTERS)
        cancel_after = 3 if n % 7 == 0 else None
        read = 0
        try:
            stream = client.stream(list(range(10, 10 + rng.randint(4, 24))), **options)
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    read += len(chunk.token_ids)
                    if cancel_after is not None and read >= cancel_after:
                        break  # the client hangs up: the call is cancelled
                    if chunk.finish_reason is not None:
                        assert chunk.finish_reason == "length" and read == options["max_new_tokens"]
                        tally.finished += 1
            if cancel_after is not None:
                tally.cancelled += 1
            tally.tokens += read
        except (OpenLoRAError, AssertionError) as exc:
            tally.errors.append(f"lane {lane_id} request {n}: {exc}")


def test_256_streams_for_minutes_leave_no_error_flat_memory_and_an_idle_worker(
    soak_cluster: tuple[Cluster, str],
) -> None:
    cluster, metrics_url = soak_cluster
    tally = Tally()

    async def soak() -> None:
        async with AsyncClient(
            cluster.gateway, api_key=cluster.api_key, retry=RetryPolicy(attempts=1), timeout_s=120
        ) as client:
            deadline = time.monotonic() + SOAK_S
            await asyncio.gather(*(lane(client, i, deadline, tally) for i in range(STREAMS)))

    with RssSampler(processes(cluster)) as rss:
        asyncio.run(soak())
    assert tally.errors == [], tally.errors[:5]
    assert tally.finished > STREAMS and tally.cancelled > 0 and tally.mixed > 0, tally

    grown = {}
    end = max(t for t, _ in rss.samples)
    for name in rss.named:
        after_warmup = rss.median(name, WARMUP_S, WARMUP_S + WINDOW_S)
        at_end = rss.median(name, end - WINDOW_S, end + 1)
        grown[name] = at_end / after_warmup - 1
    trajectory = {
        name: [round(s[name] / 2**20) for t, s in rss.samples[::10] if name in s] for name in rss.named
    }
    assert all(g < MAX_GROWTH for g in grown.values()), (
        {n: f"{g:+.1%}" for n, g in grown.items()},
        trajectory,
    )

    print(
        f"soak: {tally.finished} finished, {tally.cancelled} cancelled, {tally.mixed} mixed, "
        f"{tally.tokens} tokens; RSS growth { ({n: f'{g:+.1%}' for n, g in grown.items()}) }"
    )

    def left() -> dict[str, float]:
        return {
            "running": metric(metrics_url, "openlora_running_requests"),
            "kv blocks": metric(metrics_url, "openlora_kv_blocks_used"),
            "pinned slots": metric(metrics_url, "openlora_lora_slots", '{state="pinned"}'),
        }

    steady(left, lambda values: not any(values.values()), quiet_s=1.0, timeout_s=30)
