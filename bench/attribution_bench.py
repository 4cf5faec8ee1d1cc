"""P6: attribution ingest into PostgreSQL — token records/s, ack latency, zero lost or doubled.

Starts `openlora attribution serve` as its own process on a fresh PostgreSQL database, then streams
`--records` token records from `--streams` concurrent StreamUsage calls (batches of `--batch`,
up to `--window` batches in flight per stream). Every `--resend-every`-th batch is sent twice, as a
sender that lost an ack would. Records are serialised before the clock starts: a real worker pays
that on its own machine. Prints one JSON line.

    python bench/attribution_bench.py --records 500000 --streams 8
    python bench/attribution_bench.py --sqlite        # the embedded default, for comparison
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from openlora.v1 import adapter_store_pb2, attribution_pb2, attribution_pb2_grpc, common_pb2  # noqa: E402

from services.common.trust.credentials import token_interceptors  # noqa: E402
from tests.kit.service_auth import TableCaller  # noqa: E402
from tests.kit.service_auth import install as install_service_secret  # noqa: E402

ADAPTERS = [f"adapter-{i}" for i in range(16)]
TENANTS = ["acme", "globex", "initech"]
STREAM_METHOD = "/openlora.v1.Attribution/StreamUsage"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def token_adapters(request: int) -> list[attribution_pb2.WeightedAdapter]:
    first = common_pb2.AdapterRef(id=ADAPTERS[request % len(ADAPTERS)], version="v1")
    if request % 4:
        return [attribution_pb2.WeightedAdapter(adapter=first, weight=1.0)]
    second = common_pb2.AdapterRef(id=ADAPTERS[(request + 5) % len(ADAPTERS)], version="v1")
    return [
        attribution_pb2.WeightedAdapter(adapter=first, weight=0.75),
        attribution_pb2.WeightedAdapter(adapter=second, weight=0.25),
    ]


def stream_batches(stream: int, records: int, batch_size: int, resend_every: int) -> tuple[list[bytes], int]:
    """Serialised batches of one stream (with resends mixed in) and how many distinct records."""
    worker = f"bench-{stream}"
    now = time.time()
    tokens: list[attribution_pb2.TokenUsage] = []
    request = 0
    while len(tokens) < records:
        request_id = f"{worker}-r{request}"
        adapters = token_adapters(request)
        tenant = TENANTS[request % len(TENANTS)]
        for kind, count in ((attribution_pb2.PROMPT, 64), (attribution_pb2.COMPLETION, 192)):
            for index in range(count):
                usage = attribution_pb2.TokenUsage(
                    request_id=request_id,
                    token_index=index,
                    kind=kind,
                    adapters=adapters,
                    tenant=tenant,
                    worker_id=worker,
                )
                usage.ts.FromMicroseconds(int((now + len(tokens) * 1e-5) * 1e6))
                tokens.append(usage)
        request += 1
    tokens = tokens[:records]
    payloads = []
    for sequence, start in enumerate(range(0, len(tokens), batch_size), start=1):
        message = attribution_pb2.UsageBatch(
            sequence=sequence, worker_id=worker, records=tokens[start : start + batch_size]
        )
        payloads.append(message.SerializeToString())
        if resend_every and sequence % resend_every == 0:
            payloads.append(payloads[-1])
    return payloads, len(tokens)


async def run_stream(
    channel: grpc.aio.Channel, payloads: Sequence[bytes], window: int, latencies: list[float]
) -> int:
    call = channel.stream_stream(
        STREAM_METHOD,
        request_serializer=lambda b: b,
        response_deserializer=attribution_pb2.RecordAck.FromString,
    )()
    sent_at: list[float] = []
    in_flight = asyncio.Semaphore(window)
    inserted = 0

    async def writer() -> None:
        for payload in payloads:
            await in_flight.acquire()
            sent_at.append(time.perf_counter())
            await call.write(payload)
        await call.done_writing()

    writing = asyncio.create_task(writer())
    for index in range(len(payloads)):
        ack = await call.read()
        assert isinstance(ack, attribution_pb2.RecordAck), "stream ended early"
        latencies.append(time.perf_counter() - sent_at[index])
        inserted += ack.inserted_records
        in_flight.release()
    await writing
    return inserted


async def register_provenance(stub: attribution_pb2_grpc.AttributionAsyncStub) -> None:
    for adapter_id in ADAPTERS:
        await stub.RegisterProvenance(
            attribution_pb2.RegisterProvenanceRequest(
                adapter=common_pb2.AdapterRef(id=adapter_id, version="v1"),
                provenance=adapter_store_pb2.Provenance(
                    trainer="bench",
                    contributors=[
                        adapter_store_pb2.Contributor(
                            id=f"{adapter_id}-trainer", role=adapter_store_pb2.TRAINER, share=0.7
                        ),
                        adapter_store_pb2.Contributor(
                            id="corpus-owner", role=adapter_store_pb2.DATA, share=0.3
                        ),
                    ],
                ),
            )
        )


async def wait_serving(channel: grpc.aio.Channel, server: subprocess.Popen[bytes]) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit("server did not become ready")


def ledger_counts(url: str) -> dict[str, int]:
    if url.startswith("sqlite:///"):
        connection: Any = sqlite3.connect(url.removeprefix("sqlite:///"))
    else:
        connection = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://", 1))
    with contextlib.closing(connection) as conn:
        events = conn.execute("SELECT count(*) FROM usage_events").fetchone()
        rolled = conn.execute(
            "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM usage_rollups"
            " WHERE adapter_id = ''"
        ).fetchone()
        credited = conn.execute(
            "SELECT coalesce(sum(tokens_micros), 0), count(*) FROM reward_entries"
        ).fetchone()
    assert events and rolled and credited
    # Every record has adapters; each contributor line carries its adapter's tokens, and every adapter
    # here has two contributors, so credited tokens are twice the records.
    return {
        "ledger_count": int(events[0]),
        "rollup_count": int(rolled[0]),
        "credited_tokens": int(credited[0]) // 2 // 1_000_000,
        "reward_entries": int(credited[1]),
    }


async def bench(args: argparse.Namespace, database_url: str) -> dict[str, object]:
    per_stream = args.records // args.streams
    prepared = [stream_batches(s, per_stream, args.batch, args.resend_every) for s in range(args.streams)]
    expected = sum(n for _, n in prepared)
    port = free_port()
    env = {
        **os.environ,
        "OPENLORA_ATTRIBUTION_PORT": str(port),
        "OPENLORA_ATTRIBUTION_DATABASE_URL": database_url,
        "OPENLORA_ATTRIBUTION_DB_POOL_SIZE": str(max(2, args.streams)),
        "OPENLORA_ATTRIBUTION_LOG_LEVEL": "WARNING",
        "OPENLORA_ATTRIBUTION_GRACE_PERIOD_S": "5",
    }
    # A separate process, as in production: the clients here must not share its GIL.
    server = subprocess.Popen(  # noqa: ASYNC220 - started once, before the clock runs
        [sys.executable, "-m", "services.attribution.cli", "serve"], cwd=ROOT, env=env
    )
    try:
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        interceptors = token_interceptors(TableCaller(), "attribution")
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=options, interceptors=interceptors
        ) as channel:
            await wait_serving(channel, server)
            await register_provenance(attribution_pb2_grpc.AttributionStub(channel))
            latencies: list[float] = []
            started = time.perf_counter()
            inserted = await asyncio.gather(
                *(run_stream(channel, p, args.window, latencies) for p, _ in prepared)
            )
            elapsed = time.perf_counter() - started
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    latencies.sort()
    counts = ledger_counts(database_url)
    return {
        "bench": "attribution_ingest",
        "database": "sqlite" if database_url.startswith("sqlite") else "postgresql",
        "records": expected,
        "streams": args.streams,
        "batch": args.batch,
        "window": args.window,
        "resent_batches": sum(len(p) for p, _ in prepared) - sum(-(-n // args.batch) for _, n in prepared),
        "seconds": round(elapsed, 3),
        "records_per_s": round(expected / elapsed),
        "ack_p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
        "ack_p99_ms": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000, 2),
        "acked_inserted": sum(inserted),
        **counts,
        "count_ok": counts["ledger_count"]
        == expected
        == sum(inserted)
        == counts["rollup_count"]
        == counts["credited_tokens"],
    }


def main() -> None:
    install_service_secret()  # attribution checks who calls it, as in production
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=400_000)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--batch", type=int, default=2_000)
    parser.add_argument("--window", type=int, default=2, help="batches in flight per stream")
    parser.add_argument("--resend-every", type=int, default=10, help="send every n-th batch twice (0: never)")
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("OPENLORA_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        help="PostgreSQL database to create the bench database from",
    )
    parser.add_argument(
        "--sqlite", action="store_true", help="use a SQLite file (the embedded default) instead"
    )
    args = parser.parse_args()
    if args.sqlite:
        with tempfile.TemporaryDirectory() as folder:
            result = asyncio.run(bench(args, f"sqlite:///{folder}/ledger.sqlite3"))
        report(result)
        return
    name = f"openlora_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    database_url = (
        args.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + f"/{name}"
    )
    try:
        result = asyncio.run(bench(args, database_url))
    finally:
        with psycopg.connect(args.admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    report(result)


def report(result: dict[str, object]) -> None:
    print(json.dumps(result))
    if not result["count_ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
