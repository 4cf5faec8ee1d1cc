"""A worker front with no engine process: the real `EngineClient`, `WorkerService`, servicer and relay
link, driven by handing the client engine steps as the engine process's messages would carry them.
For tests of what the front makes of a step, and for `bench/front_bench.py`."""

from __future__ import annotations

import asyncio
from typing import Any

from openlora.v1 import inference_pb2, relay_pb2
from opentelemetry import trace
from prometheus_client import CollectorRegistry

from services.common.interceptors import InflightCalls
from services.inference.adapters import AdapterResolver
from services.inference.engine.sequence import FinishReason
from services.inference.engine_process import protocol
from services.inference.engine_process.client import EngineClient
from services.inference.engine_process.protocol import EngineInfo
from services.inference.relay_server import _Link
from services.inference.service import ModelDescription, WorkerService
from services.inference.servicer import InferenceServicer
from services.inference.usage.reporter import UsageReporter
from services.inference.validation import Limits
from services.inference.worker_metrics import WorkerMetrics


class SentToEngine:
    """Stands in for the engine process: keeps what the client sends it."""

    pid = 0

    def __init__(self) -> None:
        self.messages: list[list[Any]] = []

    def send(self, message: list[Any]) -> None:
        self.messages.append(message)

    @property
    def aborted(self) -> list[str]:
        return [rid for kind, _, aborts in self.messages if kind == protocol.COMMANDS for rid in aborts]

    @property
    def added(self) -> list[str]:
        return [add[0] for kind, adds, _ in self.messages if kind == protocol.COMMANDS for add in adds]


class Front:
    def __init__(self, tokenizer: Any, reporter: UsageReporter | None = None, **client_settings: Any) -> None:
        self.engine = EngineClient(lambda *_: None, env={}, **client_settings)  # type: ignore[arg-type]
        self.sent = SentToEngine()
        self.engine._process = self.sent  # type: ignore[assignment]
        self.engine.info = EngineInfo(0, tokenizer.vocab_size, 8192, 1 << 20, None, 1)
        tracer = trace.get_tracer("front-kit")
        service = WorkerService(
            engine=self.engine,
            tokenizer=tokenizer,
            resolver=AdapterResolver(None, None, tracer),
            reporter=reporter,
            metrics=WorkerMetrics(CollectorRegistry(), lambda: None, lambda: None),
            limits=Limits(8192, 256, 4096, tokenizer.vocab_size),
            model=ModelDescription("kit", "float32", "none", 8192, "torch", "segment"),
            worker_id="kit",
            tracer=tracer,
        )
        self.servicer = InferenceServicer(service, None)
        self.link = _Link(self.servicer.serve, InflightCalls(), None)

    async def start(self, stream_id: int, prompt: list[int], **sampling: Any) -> str:
        """Start a relayed stream; returns the id the engine knows its request by."""
        request = inference_pb2.GenerateRequest(request_id=f"r{stream_id}", tenant="kit")
        request.token_ids.ids.extend(prompt)
        for key, value in sampling.items():
            if key == "stop":
                request.sampling.stop.extend(value)
            else:
                setattr(request.sampling, key, value)
        known = set(self.engine._streams)
        self.link._start(relay_pb2.RelayStart(stream_id=stream_id, request=request))
        for _ in range(100):
            await asyncio.sleep(0)
            new = set(self.engine._streams) - known
            if new:
                return new.pop()
        raise AssertionError(f"stream {stream_id} never reached the engine client")

    def step(self, tokens: dict[str, list[int]], finished: frozenset[str] = frozenset()) -> None:
        """One engine step: these requests' new tokens; those in `finished` reached their length."""
        outputs = [
            protocol.encode_output(rid, ids, [], FinishReason.LENGTH if rid in finished else None)
            for rid, ids in tokens.items()
        ]
        self.engine._on_step(outputs, None, None)

    def answer_aborts(self, taken: dict[str, int]) -> None:
        """The engine's answer to aborts: how many prompt tokens each request had taken in."""
        self.engine._on_message([protocol.ABORTED, [[rid, n] for rid, n in taken.items()]])

    async def drained(self) -> None:
        """Let every task the last steps woke (aborts, stream ends) run to its next wait."""
        for _ in range(20):
            await asyncio.sleep(0)

    def write(self) -> list[relay_pb2.RelayEvent]:
        """What the link's next write carries; the write then completes (its senders may send again)."""
        events, senders = self.link._take()
        for sender in senders:
            if sender is not None:
                sender._written()
        return events


def chunk_of(event: relay_pb2.RelayEvent) -> inference_pb2.GenerateChunk:
    return inference_pb2.GenerateChunk.FromString(event.chunk)
