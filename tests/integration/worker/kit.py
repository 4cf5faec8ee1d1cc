"""Workers, ledgers and reference outputs for the worker's tests.

`WorkerUnderTest` runs a real worker in the test's event loop (port and metrics port picked by the
OS); the process-level tests start `openlora worker serve` instead. `reference_outputs` replays the
same requests on an engine of the test's own, the ground truth every stream must equal.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa
from google.rpc import error_details_pb2, status_pb2
from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.common.grpc_client import open_channel
from services.common.trust.roles import GATEWAY
from services.inference.adapter_cache import LoadedAdapter
from services.inference.app import WorkerApp
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams
from services.inference.settings import WorkerSettings
from tests.kit.service_auth import as_role

KV_CACHE_BYTES = 1 << 22  # 4 MiB: hundreds of blocks of the tiny model, small enough to see usage


def worker_settings(tmp_path: Path, model: Path, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "port": 0,
        "metrics_port": 0,
        "model": str(model),
        "worker_id": "worker-test",
        "dtype": "float32",  # the references (`reference_outputs`, PEFT, HF) run in float32
        "kv_cache_bytes": KV_CACHE_BYTES,
        "lora_slots": 4,
        "lora_max_rank": 16,
        "store_address": None,
        "attribution_address": None,
        "spool_dir": tmp_path / "spool",
        "cache_dir": tmp_path / "adapter-cache",
        "cache_host_bytes": 1 << 26,
        "cache_disk_bytes": 1 << 26,
        "usage_backoff_max_s": 0.5,
        "usage_drain_timeout_s": 2.0,
        "log_level": "WARNING",
    }
    return WorkerSettings(**(values | overrides))


@dataclass
class WorkerUnderTest:
    worker: WorkerApp
    channel: grpc.aio.Channel
    stub: inference_pb2_grpc.InferenceAsyncStub
    port: int

    @classmethod
    async def start(cls, settings: WorkerSettings) -> WorkerUnderTest:
        worker = WorkerApp(settings)
        port = await worker.start()
        await worker.wait_ready()
        channel = open_channel(f"127.0.0.1:{port}", **as_role(GATEWAY, "worker"))
        return cls(worker, channel, inference_pb2_grpc.InferenceStub(channel), port)

    async def stop(self) -> None:
        await self.channel.close()
        await self.worker.stop()

    def metrics(self) -> dict[str, float]:
        """The unlabelled samples of /metrics, by name."""
        url = f"http://127.0.0.1:{self.worker.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        return {m[1]: float(m[2]) for m in re.finditer(r"^([a-z_]+) ([0-9.e+-]+)$", text, re.MULTILINE)}


def request(
    prompt: Sequence[int] | str,
    *,
    adapter: str | None = None,
    max_new_tokens: int = 8,
    request_id: str = "",
    tenant: str = "acme",
    **sampling: Any,
) -> inference_pb2.GenerateRequest:
    message = inference_pb2.GenerateRequest(
        request_id=request_id,
        tenant=tenant,
        sampling=common_pb2.SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, **sampling),
    )
    if isinstance(prompt, str):
        message.text = prompt
    else:
        message.token_ids.ids.extend(prompt)
    if adapter is not None:
        adapter_id, _, version = adapter.partition("@")
        message.adapter_ref.id, message.adapter_ref.version = adapter_id, version
    return message


@dataclass
class Streamed:
    token_ids: list[int]
    text: str
    finish_reason: int
    prompt_tokens: int
    completion_tokens: int


async def collect(
    stub: inference_pb2_grpc.InferenceAsyncStub, message: inference_pb2.GenerateRequest
) -> Streamed:
    ids: list[int] = []
    text = ""
    last = inference_pb2.GenerateChunk()
    async for chunk in stub.Generate(message, timeout=120):
        ids.extend(chunk.token_ids)
        text += chunk.text
        last = chunk
    return Streamed(ids, text, last.finish_reason, last.usage.prompt_tokens, last.usage.completion_tokens)


def bad_field(exc: grpc.aio.AioRpcError) -> str:
    """The field a google.rpc.BadRequest detail of the error names."""
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                bad = error_details_pb2.BadRequest()
                if detail.Unpack(bad):
                    return str(bad.field_violations[0].field)
    raise AssertionError(f"no BadRequest detail in {exc.code().name}: {exc.details()}")


def reference_outputs(
    model: Path,
    adapters: dict[str, LoadedAdapter],
    requests: Sequence[tuple[list[int], str | None, int]],
    lora_slots: int,
) -> list[list[int]]:
    """Greedy outputs of (prompt ids, adapter key or None, max_new_tokens), on an engine of our own."""
    engine = LLMEngine.from_pretrained(
        model, EngineConfig(kv_cache_bytes=KV_CACHE_BYTES * 4, lora_slots=lora_slots, lora_max_rank=16)
    )
    for key, adapter in adapters.items():
        engine.add_adapter(key, adapter)
    seqs = [
        engine.add_request(
            f"ref-{i}", prompt, SamplingParams(max_new_tokens=n, ignore_eos=True), adapter_key=key
        )
        for i, (prompt, key, n) in enumerate(requests)
    ]
    while engine.has_unfinished():
        engine.step()
    return [list(s.output_token_ids) for s in seqs]


def ledger_counts(url: str) -> dict[tuple[str, int], int]:
    """Tokens in the usage ledger per (client request id, kind). The ledger's own key is the worker's
    usage id; `served_requests` checks that each client id was one served request."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT client_request_id, kind, sum(token_count) FROM usage_events "
                    "GROUP BY client_request_id, kind"
                )
            ).all()
    finally:
        engine.dispose()
    return {(r[0], int(r[1])): int(r[2]) for r in rows}


def ledger_adapters(url: str, request_id: str) -> set[str]:
    """The distinct `adapters` columns of the ledger rows of one client request id."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT DISTINCT adapters FROM usage_events WHERE client_request_id = :r"),
                {"r": request_id},
            ).all()
    finally:
        engine.dispose()
    return {str(r[0]) for r in rows}


def served_requests(url: str) -> dict[str, set[str]]:
    """Client request id -> the usage ids (one per served request) the ledger holds under it."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT DISTINCT client_request_id, request_id FROM usage_events")
            ).all()
    finally:
        engine.dispose()
    served: dict[str, set[str]] = {}
    for client_id, usage_id in rows:
        served.setdefault(str(client_id), set()).add(str(usage_id))
    return served
