"""A scripted `Inference` service for testing the server kit without an engine.

`Generate` streams one chunk per token (`max_new_tokens` of them, `delay_s` apart) and then a final
chunk with `finish_reason` and `usage`. Prompts trigger failures: `boom` raises a plain exception (the
kit must turn it into INTERNAL without leaking it), `""` raises InvalidArgument on `text`.

Run as a program it serves on a port and prints `PORT <n>` once listening, for shutdown tests:
    python -m tests.kit.scripted_inference --delay 0.2 --grace 10
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.common.errors import InvalidArgument
from services.common.grpc_server import GrpcServer, ServiceBinding
from services.common.log import configure_logging, current_request_id
from services.common.settings import ServiceSettings

SECRET = "s3cr3t-internal-detail"


class ScriptedInference(inference_pb2_grpc.InferenceServicer):
    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.cancelled = asyncio.Event()
        self.seen_request_ids: list[str | None] = []

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[inference_pb2.GenerateChunk]:
        self.seen_request_ids.append(current_request_id())
        if request.WhichOneof("prompt") != "text" or not request.text:
            raise InvalidArgument("text", "must not be empty")
        if request.text == "boom":
            raise RuntimeError(f"exploded with {SECRET}")
        count = request.sampling.max_new_tokens or 4
        try:
            for index in range(count):
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                yield inference_pb2.GenerateChunk(token_ids=[index], text=f"t{index} ")
        except (asyncio.CancelledError, GeneratorExit):  # in its sleep, or closed at a yield
            self.cancelled.set()
            raise
        yield inference_pb2.GenerateChunk(
            finish_reason=inference_pb2.LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(request.text.split()), completion_tokens=count),
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Any
    ) -> inference_pb2.ListModelsResponse:
        return inference_pb2.ListModelsResponse(
            base_model=inference_pb2.ModelInfo(name="scripted"), worker_id="scripted-1"
        )


def binding(servicer: ScriptedInference) -> ServiceBinding:
    return ServiceBinding(
        name=inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
        attach=lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--grace", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    configure_logging("scripted", level="INFO", fmt="json")
    settings = ServiceSettings(port=args.port, grace_period_s=args.grace)
    server = GrpcServer(settings, [binding(ScriptedInference(args.delay))], component="scripted")
    asyncio.run(server.serve_until_signal(on_started=lambda port: print(f"PORT {port}", flush=True)))


if __name__ == "__main__":
    main()
