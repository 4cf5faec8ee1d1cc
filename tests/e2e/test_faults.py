"""Faults injected into a real cluster (two tiny-model workers, the store, attribution on a PostgreSQL of
this module's own, the gateway), each asserting exact outcomes under load through the gateway:

- R3 the store stopped: adapters a worker holds keep serving; a cold one fails `UNAVAILABLE` well
  before its deadline; the store back, the cold one serves.
- R1 a worker killed (SIGKILL) mid-stream: streams that had chunks end `UNAVAILABLE`, the rest finish
  elsewhere; restarted on its spool, the worker bills every token any client received.
- R2 attribution stopped for 60 s, and PostgreSQL restarted, under load: once they are back, the
  ledger holds exactly the tokens streamed.
- The spool's disk filled (a small tmpfs, root only): usage waits in memory with the alarm raised, and
  nothing is lost once space returns. A spool segment corrupted on disk: the damaged batch is set aside
  with a log line, every other batch replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from openlora.errors import OpenLoRAError
from openlora.v1 import attribution_pb2

from services.cluster.up import Cluster, ClusterConfig
from services.inference.usage import frames
from tests.e2e.cluster_kit import eventually, running_cluster, upload_adapter
from tests.e2e.fault_kit import (
    ADAPTERS,
    PROMPT,
    TENANT,
    Load,
    client_of,
    index_of,
    restart_child,
    settled_billing,
    signal_child,
    stop_child,
    workers_idle,
)
from tests.kit.private_postgres import PrivatePostgres, PrivatePostgresUnavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# Completion tokens a broken stream may be billed beyond those its client read: chunks the worker had
# handed to its transport (and billed) that had not reached the client when the stream broke.
ON_THE_WIRE = 64
ATTRIBUTION_OUTAGE_S = 60
SPOOL_DISK_BYTES = 16 << 20  # each worker's spool on a tmpfs this small, to fill it (as root)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PrivatePostgres]:
    try:
        server = PrivatePostgres()
    except PrivatePostgresUnavailable as exc:
        pytest.skip(f"a private PostgreSQL cannot run here: {exc}")
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.remove()


@pytest.fixture(scope="module")
def database_url(postgres: PrivatePostgres) -> str:
    return postgres.create_database("openlora_faults")


@dataclass
class Rig:
    """The cluster, its children's logs, its data folder, and whether its spools are on small disks."""

    cluster: Cluster
    logs: io.StringIO
    data_dir: Path
    spools_on_tmpfs: bool

    def spool_dirs(self) -> list[Path]:
        return [self.data_dir / f"worker-{i}" / "spool" for i in range(len(self.cluster.workers))]

    def metrics_port(self, worker: str) -> int:
        """The metrics port a worker (`worker-0`) logged at its latest start."""
        found = re.findall(rf"{worker} \|.*metrics on http://[^:]+:(\d+)/metrics", self.logs.getvalue())
        assert found, f"{worker} logged no metrics port"
        return int(found[-1])


@pytest.fixture(scope="module")
def rig(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    data_dir = tmp_path_factory.mktemp("cluster")
    config = ClusterConfig(
        data_dir=data_dir,
        model="tiny",
        workers=2,
        gateway_port=0,
        http_port=0,
        database_url=database_url,
        tenant=TENANT,
        log_level="INFO",  # the tests read the workers' metrics ports and spool warnings from the logs
    )
    env = {"OPENLORA_WORKER_USAGE_FLUSH_INTERVAL_S": "0.5"}
    with contextlib.ExitStack() as mounts:
        on_tmpfs = os.geteuid() == 0
        if on_tmpfs:
            for i in range(config.workers):
                mounts.enter_context(small_disk(data_dir / f"worker-{i}" / "spool", SPOOL_DISK_BYTES))
        with running_cluster(config, env) as (running, logs):
            for i, name in enumerate(ADAPTERS):
                folder = tmp_path_factory.mktemp(f"a{i}")
                asyncio.run(upload_adapter(running, name.split("/")[1], i + 1, folder))
            yield Rig(running, logs, data_dir, on_tmpfs)


@pytest.fixture(scope="module")
def cluster(rig: Rig) -> Cluster:
    return rig.cluster


@contextlib.contextmanager
def small_disk(folder: Path, size: int) -> Iterator[Path]:
    """A tmpfs of `size` bytes mounted at `folder` (root only), unmounted afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


# --- R3: the store down


def test_with_the_store_down_warm_adapters_serve_and_a_cold_one_fails_unavailable_in_time(
    cluster: Cluster, tmp_path: Path
) -> None:
    async def scenario() -> None:
        async with client_of(cluster) as client, client_of(cluster, timeout_s=20) as impatient:
            for adapter in ADAPTERS[:2]:  # warm: resident on whichever worker serves them
                await client.generate(PROMPT, adapter=adapter, max_new_tokens=4)
            await upload_adapter(cluster, "cold", 99, tmp_path)  # stored, never served
            stop_child(cluster, "store")
            try:
                for adapter in ADAPTERS[:2]:
                    done = await client.generate(PROMPT, adapter=adapter, max_new_tokens=8, ignore_eos=True)
                    assert done.completion_tokens == 8 and done.finish_reason == "length"
                started = time.monotonic()
                with pytest.raises(OpenLoRAError) as refused:
                    await impatient.generate(PROMPT, adapter=f"{TENANT}/cold", max_new_tokens=4)
                took = time.monotonic() - started
                assert refused.value.code == grpc.StatusCode.UNAVAILABLE, refused.value
                assert took < 15, f"UNAVAILABLE came after {took:.1f}s of a 20 s deadline"
            finally:
                await asyncio.to_thread(restart_child, cluster, "store")
            # The gateway and the workers find the store again within their reconnect backoff (≤ 5 s).
            back = time.monotonic()
            while True:
                try:
                    done = await client.generate(PROMPT, adapter=f"{TENANT}/cold", max_new_tokens=4)
                    break
                except OpenLoRAError as exc:
                    assert exc.code == grpc.StatusCode.UNAVAILABLE, exc
                    assert time.monotonic() - back < 10, f"still {exc} 10 s after the store came back"
                    await asyncio.sleep(0.25)
            assert done.completion_tokens == 4

    asyncio.run(scenario())


# --- R1: a worker killed mid-stream


def test_a_worker_killed_mid_stream_bills_every_delivered_token_and_the_rest_finish_elsewhere(
    cluster: Cluster, database_url: str
) -> None:
    load = Load(cluster)

    async def scenario() -> None:
        async with client_of(cluster) as client:
            streams = [asyncio.create_task(load.one(client, i, 600)) for i in range(16)]
            deadline = time.monotonic() + 60
            while not all(o.delivered >= 3 for o in load.outcomes) or len(load.outcomes) < 16:
                assert time.monotonic() < deadline, "the streams did not start"
                await asyncio.sleep(0.005)
            await asyncio.to_thread(signal_child, cluster, "worker-0", signal.SIGKILL)
            # Requests arriving now, with no chunk yet, must go to the surviving worker.
            late = [asyncio.create_task(load.one(client, 100 + i, 20)) for i in range(8)]
            await asyncio.gather(*streams, *late)

    asyncio.run(scenario())
    broken = [o for o in load.outcomes if o.error is not None]
    finished = [o for o in load.outcomes if o.error is None]
    assert broken, "worker-0 had no stream in flight when it was killed"
    for outcome in broken:
        assert outcome.error == grpc.StatusCode.UNAVAILABLE, outcome
        assert outcome.request_id in outcome.error_message and outcome.delivered >= 3, outcome
    for outcome in finished:
        assert outcome.finish_reason == "length", outcome
        assert outcome.delivered == (20 if index_of(outcome) >= 100 else 600), outcome
        assert outcome.prompt_tokens == len(PROMPT), outcome
    assert all(o.error is None for o in load.outcomes[16:]), "a request with no chunk was not retried"

    restart_child(cluster, "worker-0")  # on its own spool: what it billed before dying is sent now
    eventually(lambda: workers_idle(cluster), 60)
    ledger = settled_billing(database_url, load.outcomes)
    for outcome in broken:
        prompt, completion = ledger[outcome.request_id]
        assert prompt == len(PROMPT), (outcome, ledger[outcome.request_id])
        assert outcome.delivered <= completion <= outcome.delivered + ON_THE_WIRE, (outcome, completion)
    for outcome in finished:
        assert ledger[outcome.request_id] == (len(PROMPT), outcome.delivered), outcome


# --- R2: attribution down, PostgreSQL restarted


def run_load_around(
    cluster: Cluster, fault: Callable[[], None], concurrency: int = 8, max_new_tokens: int = 48
) -> Load:
    """Streams through the gateway from 2 s before `fault` (a blocking callable) until 2 s after it."""
    load = Load(cluster)

    async def scenario() -> None:
        stop = asyncio.Event()
        running = asyncio.create_task(load.waves(concurrency, max_new_tokens, stop))
        await asyncio.sleep(2)
        await asyncio.to_thread(fault)
        await asyncio.sleep(2)
        stop.set()
        await running

    asyncio.run(scenario())
    return load


def assert_served_and_billed_exactly(load: Load, database_url: str) -> None:
    failed = [o for o in load.outcomes if o.error is not None or o.finish_reason != "length"]
    assert not failed, failed[:3]
    assert all(o.delivered == load.outcomes[0].delivered for o in load.outcomes)
    ledger = settled_billing(database_url, load.outcomes, timeout_s=120)
    assert ledger == {o.request_id: (len(PROMPT), o.delivered) for o in load.outcomes}


def test_attribution_down_for_60_s_under_load_loses_and_doubles_no_usage(
    cluster: Cluster, database_url: str
) -> None:
    def outage() -> None:
        stop_child(cluster, "attribution", signal.SIGKILL)
        time.sleep(ATTRIBUTION_OUTAGE_S)
        restart_child(cluster, "attribution")

    load = run_load_around(cluster, outage)
    assert len(load.outcomes) > 100  # served all along: the workers spooled what they billed
    assert_served_and_billed_exactly(load, database_url)


def test_postgresql_restarted_under_load_loses_and_doubles_no_usage(
    cluster: Cluster, database_url: str, postgres: PrivatePostgres
) -> None:
    def restart() -> None:
        postgres.stop("fast")  # every connection dropped, as in a failover
        time.sleep(3)
        postgres.start()

    load = run_load_around(cluster, restart)
    assert_served_and_billed_exactly(load, database_url)


# --- the spool's disk: full, then damaged


def fill(folder: Path) -> Path:
    """Write zeros into `folder` until its disk is full; return the filler file."""
    filler = folder / "filler.bin"
    block = bytes(64 << 10)
    with filler.open("wb", buffering=0) as out, contextlib.suppress(OSError):  # ENOSPC: full
        while True:
            out.write(block)
    return filler


def spool_full_alarms(rig: Rig) -> int:
    """The counter `openlora_usage_spool_full` summed over the workers' /metrics."""
    total = 0.0
    for i in range(len(rig.cluster.workers)):
        port = rig.metrics_port(f"worker-{i}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        total += sum(
            float(v) for v in re.findall(r"^openlora_usage_spool_full_total(?:\{[^}]*\})? (\S+)$", text, re.M)
        )
    return int(total)


def test_a_full_spool_disk_keeps_usage_in_memory_with_an_alarm_and_loses_none_once_space_returns(
    rig: Rig, database_url: str
) -> None:
    if not rig.spools_on_tmpfs:
        pytest.skip("filling a disk needs the spools on a small tmpfs, which only root can mount")
    cluster = rig.cluster
    alarms_before = spool_full_alarms(rig)
    fillers = [fill(folder) for folder in rig.spool_dirs()]
    try:
        load = Load(cluster)

        async def burst() -> None:
            async with client_of(cluster) as client:
                await asyncio.gather(*(load.one(client, i, 24) for i in range(16)))

        asyncio.run(burst())
        assert all(o.finish_reason == "length" for o in load.outcomes)  # serving does not wait for the disk
        eventually(lambda: True if spool_full_alarms(rig) > alarms_before else None, 30)
        assert "usage spool full" in rig.logs.getvalue()
        # (Some batches may still land: an append into a segment's last, partly written page needs no
        # new space on a tmpfs. What matters is that none is lost.)
    finally:
        for filler in fillers:
            filler.unlink()
    assert_served_and_billed_exactly(load, database_url)
    assert "usage spool has room again" in rig.logs.getvalue()


def spooled_frames(folder: Path) -> Iterator[tuple[Path, frames.Frame, attribution_pb2.UsageBatch]]:
    for segment in sorted(folder.glob("seg-*.v2")):
        data = segment.read_bytes()
        for found in frames.scan(data):
            if isinstance(found, frames.Frame):
                body = data[found.offset : found.offset + found.length]
                yield segment, found, attribution_pb2.UsageBatch.FromString(body)


def test_a_corrupt_spool_segment_is_set_aside_with_a_log_line_and_every_other_batch_is_replayed(
    rig: Rig, database_url: str
) -> None:
    cluster = rig.cluster
    stop_child(cluster, "attribution", signal.SIGKILL)  # batches stay in the spools, unacked
    load = Load(cluster)

    async def one_by_one() -> None:
        async with client_of(cluster) as client:
            for i in range(6):
                await load.one(client, i, 6)
                await asyncio.sleep(0.6)  # past a flush interval: each request in a batch of its own

    asyncio.run(one_by_one())
    assert all(o.finish_reason == "length" for o in load.outcomes)
    victim = load.outcomes[2].request_id

    def victims_batch() -> tuple[int, Path, frames.Frame, attribution_pb2.UsageBatch] | None:
        for worker, folder in enumerate(rig.spool_dirs()):
            for segment, frame, batch in spooled_frames(folder):
                if any(r.client_request_id == victim for r in batch.records):
                    return worker, segment, frame, batch
        return None

    worker, segment, frame, batch = eventually(victims_batch, 10)
    stop_child(cluster, f"worker-{worker}")  # SIGTERM: the rest of its usage is flushed to the spool
    # One flipped byte in the body of the batch holding the third request's records.
    data = bytearray(segment.read_bytes())
    data[frame.offset + frame.length // 2] ^= 0xFF
    segment.write_bytes(bytes(data))
    lost: dict[str, list[int]] = {}
    for r in batch.records:
        counts = lost.setdefault(r.client_request_id, [0, 0])
        counts[0 if r.kind == attribution_pb2.PROMPT else 1] += r.token_count

    restart_child(cluster, "attribution")
    restart_child(cluster, f"worker-{worker}")
    logs = rig.logs.getvalue()
    assert re.search(
        rf"worker-{worker} \|.*usage spool: \d+ damaged byte\(s\) at offset \d+ of {segment.name}", logs
    )
    assert list(segment.parent.glob(f"damaged-{segment.name}-*.bin"))
    expected = {}
    for o in load.outcomes:
        gone = lost.get(o.request_id, [0, 0])
        expected[o.request_id] = (len(PROMPT) - gone[0], o.delivered - gone[1])
    assert expected[victim] != (len(PROMPT), load.outcomes[2].delivered)
    ledger = settled_billing(database_url, load.outcomes, exact=False)
    assert ledger == expected
