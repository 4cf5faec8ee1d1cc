"""The least a Python gRPC server can spend on a streamed Generate call: `relay_bench.py`'s floor.

Serves `openlora.v1.Inference/Generate` on a bare `grpc.aio` server (no interceptors, no
authentication, no upstream call): parses the request as the gateway does, then yields
`max_new_tokens` chunks that were serialized once at start-up, `--delay-s` apart, and a last chunk,
through the same pass-through serializer the gateway uses. Its CPU per chunk is what grpcio itself
costs for the public call on this machine, the bound under any gateway written on it.

    python bench/grpc_floor_server.py --port 50999 [--delay-s 0.02]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openlora.v1 import common_pb2, inference_pb2

from services.common.contracts import SERVICE_NAMES

TOKEN_CHUNK = inference_pb2.GenerateChunk(token_ids=[7], text="w").SerializeToString()


async def serve(port: int, delay_s: float) -> None:
    async def generate(request: inference_pb2.GenerateRequest, context: Any) -> AsyncIterator[bytes]:
        count = request.sampling.max_new_tokens or 4
        for index in range(count):
            if index:
                await asyncio.sleep(delay_s)
            yield TOKEN_CHUNK
        yield inference_pb2.GenerateChunk(
            finish_reason=inference_pb2.LENGTH,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=count),
        ).SerializeToString()

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            generate, request_deserializer=inference_pb2.GenerateRequest.FromString, response_serializer=None
        )
    }
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAMES["inference"], handlers),)
    )
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-s", type=float, default=0.02)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay_s))


if __name__ == "__main__":
    main()
