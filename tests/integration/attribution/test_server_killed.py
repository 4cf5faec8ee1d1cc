"""The attribution process is SIGKILLed while a batch is in flight, on PostgreSQL and SQLite: every
acked record survives, the in-flight batch is all or nothing, and the sender's resend from its last
ack (against a restarted server) ends with every record counted exactly once."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from openlora.v1 import attribution_pb2, attribution_pb2_grpc
from sqlalchemy import func, select

from services.attribution import db
from services.attribution.models import RewardLedgerEntry, UsageEvent
from services.common.grpc_client import health_status, open_channel
from tests.integration.attribution.wire import batch, read_ack, request_tokens
from tests.kit.ports import free_port
from tests.kit.service_auth import trusted

ROOT = Path(__file__).resolve().parents[3]
BATCH = 5_000


class ServerProcess:
    def __init__(self, database_url: str) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "OPENLORA_ATTRIBUTION_PORT": str(self.port),
            "OPENLORA_ATTRIBUTION_DATABASE_URL": database_url,
            "OPENLORA_ATTRIBUTION_LOG_LEVEL": "WARNING",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.attribution.cli", "serve"], cwd=ROOT, env=env
        )

    async def wait_ready(self) -> None:
        async with open_channel(f"127.0.0.1:{self.port}", **trusted("attribution")) as channel:
            for _ in range(300):
                assert self.process.poll() is None, "server exited"
                try:
                    if await health_status(channel, timeout=1) == "SERVING":
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError("server not ready")

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)


@pytest.fixture
def servers(ledger_url: str) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        if server.process.poll() is None:
            server.kill()


def events(database_url: str) -> tuple[int, int]:
    engine = db.make_engine(database_url)
    try:
        with engine.connect() as conn:
            count = conn.execute(select(func.count()).select_from(UsageEvent)).scalar_one()
            credited = conn.execute(
                select(func.coalesce(func.sum(RewardLedgerEntry.tokens_micros), 0))
            ).scalar_one()
            return int(count), int(credited)
    finally:
        engine.dispose()


@pytest.mark.slow
async def test_killed_server_loses_nothing_acked_and_resend_doubles_nothing(
    ledger_url: str, servers: list[ServerProcess]
) -> None:
    tokens = request_tokens("req-killed", prompt=5_000, completion=25_000)
    batches = [batch(i + 1, tokens[i * BATCH : (i + 1) * BATCH]) for i in range(len(tokens) // BATCH)]

    servers.append(ServerProcess(ledger_url))
    await servers[0].wait_ready()
    acked = 0
    async with open_channel(f"127.0.0.1:{servers[0].port}", **trusted("attribution")) as channel:
        call = attribution_pb2_grpc.AttributionStub(channel).StreamUsage()
        for message in batches[:2]:
            await call.write(message)
            acked = (await read_ack(call)).acked_sequence
        await call.write(batches[2])
        await asyncio.sleep(0.05)  # batch 3 is being validated or written
        servers[0].kill()
        call.cancel()
    assert acked == 2
    count, _ = events(ledger_url)
    assert count in (2 * BATCH, 3 * BATCH), "an acked batch was lost or the in-flight one half written"

    servers.append(ServerProcess(ledger_url))
    await servers[1].wait_ready()
    async with open_channel(f"127.0.0.1:{servers[1].port}", **trusted("attribution")) as channel:
        ack = await attribution_pb2_grpc.AttributionStub(channel).RecordUsage(iter(batches[acked:]))
    assert isinstance(ack, attribution_pb2.RecordAck)
    assert ack.acked_sequence == len(batches)
    assert ack.inserted_records + count == len(tokens)
    assert events(ledger_url) == (len(tokens), len(tokens) * 1_000_000)
