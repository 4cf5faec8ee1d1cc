"""A stand-in inference worker for the gateway's tests: real gRPC, no engine.

`Generate` streams `max_new_tokens` chunks (default 4), each one token whose text is the worker's
name, so a test sees which worker served it; `delay_s` apart, the first after `first_delay_s` (or
after N seconds for the prompt `wait:N`). It remembers what it was sent (tenant, request id,
metadata, deadline) and how many streams were cancelled.

Run as a program it serves on `--port` (0: a free one) and prints `PORT <n>`; tests kill and restart it:
    python -m tests.integration.gateway.fake_worker --name w1 --port 0 --delay 0.05
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.common.contracts import SERVICE_NAMES
from services.common.errors import InvalidArgument, Unavailable
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.log import configure_logging
from services.common.settings import ServiceSettings
from services.inference.relay_server import StreamContext, from_generator, relay_binding


@dataclass
class Seen:
    tenant: str
    request_id: str
    metadata: dict[str, str]
    time_remaining: float | None
    relayed: bool  # came over the gateway's relay call, not a Generate call of its own


@dataclass
class FakeWorker(inference_pb2_grpc.InferenceServicer):
    name: str
    delay_s: float = 0.0
    first_delay_s: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    cancelled: int = 0

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        relayed = isinstance(context, StreamContext)
        self.seen.append(
            Seen(request.tenant, request.request_id, metadata, context.time_remaining(), relayed)
        )
        if request.text == "invalid":
            raise InvalidArgument("text", "refused by the worker")
        if request.text == "unavailable":  # alive, but a dependency is down
            raise Unavailable("the adapter store is unreachable", retry_after_s=2)
        count = request.sampling.max_new_tokens or 4
        first_delay_s = self.first_delay_s
        if request.text.startswith("wait:"):  # a slow first token, to fail a worker before it
            first_delay_s = float(request.text.removeprefix("wait:"))
        try:
            await asyncio.sleep(first_delay_s)
            for index in range(count):
                if index:
                    await asyncio.sleep(self.delay_s)
                yield inference_pb2.GenerateChunk(token_ids=[index], text=self.name)
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled in its sleep, or closed at a yield while the link's write was awaited: both a hang-up.
            self.cancelled += 1
            raise
        yield inference_pb2.GenerateChunk(
            finish_reason=inference_pb2.LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(request.text.split()), completion_tokens=count),
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Any
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            base_model=inference_pb2.ModelInfo(name="fake"),
            worker_id=self.name,
            adapters=[inference_pb2.CachedAdapter(adapter=common_pb2.AdapterRef(id="someone/private"))],
        )


def fake_worker_server(
    worker: FakeWorker, port: int = 0, grace_s: float = 1.0, *, relay: bool = True, **settings: Any
) -> GrpcServer:
    binding = ServiceBinding(
        SERVICE_NAMES["inference"],
        lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(worker, server),
    )
    server_settings = ServiceSettings(port=port, grace_period_s=grace_s, log_level="WARNING", **settings)
    server = GrpcServer(server_settings, [binding], component=f"fake-{worker.name}")
    if relay:  # as a real worker serves the gateway's streams
        server.services.append(relay_binding(from_generator(worker.Generate), server))
    return server


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--first-delay", type=float, default=0.0)
    parser.add_argument("--no-relay", action="store_true", help="serve Generate calls only (an older worker)")
    args = parser.parse_args()
    configure_logging(f"fake-{args.name}", level="WARNING", fmt="json")
    worker = FakeWorker(args.name, args.delay, args.first_delay)
    server = fake_worker_server(worker, args.port, relay=not args.no_relay)
    asyncio.run(server.serve_until_signal(on_started=lambda port: print(f"PORT {port}", flush=True)))


if __name__ == "__main__":
    main()
