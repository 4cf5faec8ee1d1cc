"""The Python client of OpenLoRA: generation with adapters and per-request mixes, and your adapters.

    from openlora import Client

    with Client() as client:  # OPENLORA_TARGET (default localhost:50051) and OPENLORA_API_KEY
        for chunk in client.stream("Write a haiku", adapter="acme/poet", max_new_tokens=32):
            print(chunk.text, end="", flush=True)

`AsyncClient` is the asyncio twin. Both retry `UNAVAILABLE` on a fresh call as long as no chunk has
arrived (after that a retry would repeat tokens), and raise `OpenLoRAError` with the status code.
It needs grpcio and protobuf only; the generated stubs are `openlora.v1`.
"""

from openlora.adapters import AdapterInfo, Contributor, Provenance
from openlora.aio import AsyncClient
from openlora.errors import OpenLoRAError
from openlora.models import BaseModel, CachedAdapter, EngineStats, Models
from openlora.request import Chunk, Completion, GenerateOptions, MixComponent, build_request, parse_mix
from openlora.retry import RetryPolicy
from openlora.sync import Client

__all__ = [
    "AdapterInfo",
    "AsyncClient",
    "BaseModel",
    "CachedAdapter",
    "Chunk",
    "Client",
    "Completion",
    "Contributor",
    "EngineStats",
    "GenerateOptions",
    "MixComponent",
    "Models",
    "OpenLoRAError",
    "Provenance",
    "RetryPolicy",
    "build_request",
    "parse_mix",
]
