"""Helpers of the fault tests (`test_faults.py`): the cluster's processes stopped, killed and
restarted; streams through the gateway with what each client received; and what the ledger billed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from dataclasses import dataclass, field

import grpc
import sqlalchemy as sa
from openlora import AsyncClient
from openlora.errors import OpenLoRAError
from openlora.retry import RetryPolicy
from openlora.v1 import inference_pb2, inference_pb2_grpc

from services.attribution.models import UsageEvent
from services.cluster.supervisor import Supervisor
from services.cluster.up import Cluster
from tests.e2e.cluster_kit import operator

TENANT = "faults"
ADAPTERS = [f"{TENANT}/a{i}" for i in range(4)]
PROMPT = list(range(10, 22))  # token ids: the prompt's length is known exactly
NO_RETRY = RetryPolicy(attempts=1)  # the tests read the gateway's own statuses


# --- the cluster's processes


def _child(supervisor: Supervisor, name: str):  # type: ignore[no-untyped-def]
    return [c for c in supervisor.children if c.spec.name == name][-1]


def signal_child(cluster: Cluster, name: str, sig: signal.Signals) -> None:
    os.kill(_child(cluster.supervisor, name).process.pid, sig)


def stop_child(
    cluster: Cluster, name: str, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 30
) -> None:
    child = _child(cluster.supervisor, name)
    os.kill(child.process.pid, sig)
    deadline = time.monotonic() + timeout_s
    while child.process.returncode is None:
        assert time.monotonic() < deadline, f"{name} did not exit"
        time.sleep(0.05)


def restart_child(cluster: Cluster, name: str) -> None:
    """Start a stopped child again with its own command (same port, data and spool), until healthy."""
    child = _child(cluster.supervisor, name)
    assert child.process.returncode is not None, f"{name} is still running"
    loop = child.pump.get_loop()
    asyncio.run_coroutine_threadsafe(cluster.supervisor.start(child.spec), loop).result(600)


def worker_stats(cluster: Cluster, address: str) -> inference_pb2.EngineStats:
    with grpc.insecure_channel(address) as channel:
        reply = inference_pb2_grpc.InferenceStub(channel).ListModels(
            inference_pb2.ListModelsRequest(), timeout=10, metadata=operator(cluster, "worker")
        )
    return reply.stats


def workers_idle(cluster: Cluster) -> bool | None:
    stats = [worker_stats(cluster, w) for w in cluster.workers]
    return True if all(s.running_requests == 0 and s.kv_blocks_used == 0 for s in stats) else None


# --- load and what it was billed


def client_of(cluster: Cluster, timeout_s: float = 120) -> AsyncClient:
    return AsyncClient(cluster.gateway, api_key=cluster.api_key, retry=NO_RETRY, timeout_s=timeout_s)


@dataclass
class Outcome:
    request_id: str
    delivered: int = 0  # completion tokens the client read
    prompt_tokens: int = 0  # from the final chunk's usage
    finish_reason: str | None = None
    error: grpc.StatusCode | None = None
    error_message: str = ""
    first_chunk_at: float | None = None
    ended_at: float = 0.0


@dataclass
class Load:
    """Streams through the gateway, `concurrency` at a time, until told to stop (or `total` started)."""

    cluster: Cluster
    run: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    outcomes: list[Outcome] = field(default_factory=list)

    async def one(self, client: AsyncClient, index: int, max_new_tokens: int) -> Outcome:
        outcome = Outcome(f"{self.run}-{index}")
        self.outcomes.append(outcome)
        stream = client.stream(
            PROMPT,
            adapter=ADAPTERS[index % len(ADAPTERS)],
            max_new_tokens=max_new_tokens,
            ignore_eos=True,
            request_id=outcome.request_id,
        )
        try:
            async with contextlib.aclosing(stream) as chunks:
                async for chunk in chunks:
                    if outcome.first_chunk_at is None:
                        outcome.first_chunk_at = time.monotonic()
                    outcome.delivered += len(chunk.token_ids)
                    if chunk.finish_reason is not None:
                        outcome.finish_reason = chunk.finish_reason
                        outcome.prompt_tokens = chunk.prompt_tokens
        except OpenLoRAError as exc:
            outcome.error, outcome.error_message = exc.code, exc.message
        outcome.ended_at = time.monotonic()
        return outcome

    async def waves(self, concurrency: int, max_new_tokens: int, stop: asyncio.Event) -> None:
        async with client_of(self.cluster) as client:
            counter = iter(range(1 << 30))

            async def lane() -> None:
                while not stop.is_set():
                    await self.one(client, next(counter), max_new_tokens)

            await asyncio.gather(*(lane() for _ in range(concurrency)))


def index_of(outcome: Outcome) -> int:
    return int(outcome.request_id.rsplit("-", 1)[1])


def billed(database_url: str, client_ids: list[str]) -> dict[str, tuple[int, int]]:
    """The ledger's (prompt, completion) tokens per client request id, summed over its rows."""
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.select(UsageEvent.client_request_id, UsageEvent.kind, sa.func.sum(UsageEvent.token_count))
                .where(UsageEvent.client_request_id.in_(client_ids))
                .group_by(UsageEvent.client_request_id, UsageEvent.kind)
            ).all()
    finally:
        engine.dispose()
    totals = {r: [0, 0] for r in client_ids}
    for client_id, kind, count in rows:
        totals[client_id][0 if int(kind) == 1 else 1] += int(count)
    return {r: (p, c) for r, (p, c) in totals.items()}


def settled_billing(
    database_url: str, outcomes: list[Outcome], exact: bool = True, timeout_s: float = 60
) -> dict[str, tuple[int, int]]:
    """The ledger once it holds every finished stream's tokens and has not changed for 2 s."""
    ids = [o.request_id for o in outcomes]
    finished = {o.request_id: (o.prompt_tokens, o.delivered) for o in outcomes if o.finish_reason}
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while True:
        now = billed(database_url, ids)
        if now != last:
            last, since = now, time.monotonic()
        complete = not exact or all(now[r] == want for r, want in finished.items())
        if complete and time.monotonic() - since >= 2.0:
            return now
        if time.monotonic() > deadline:
            wrong = {r: (now[r], want) for r, want in finished.items() if now[r] != want}
            raise AssertionError(f"ledger not settled in {timeout_s:g}s; (billed, streamed): {wrong}")
        time.sleep(0.25)
