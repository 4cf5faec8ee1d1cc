"""A typed Python client for OpenLoRA's `Inference` API (through the gateway or straight to a worker).

    from services.client import Client

    with Client("localhost:50051", api_key="olk_...") as client:
        for chunk in client.stream("Write a haiku", adapter="acme/poet", max_new_tokens=32):
            print(chunk.text, end="", flush=True)

`AsyncClient` is the asyncio twin. Both retry `UNAVAILABLE` on a fresh call as long as no chunk has
arrived (after that a retry would repeat tokens), and raise `OpenLoRAError` with the status code.
"""

from services.client.aio import AsyncClient
from services.client.errors import OpenLoRAError
from services.client.request import Chunk, Completion, MixComponent, build_request, parse_mix
from services.client.retry import RetryPolicy
from services.client.sync import Client

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "Completion",
    "MixComponent",
    "OpenLoRAError",
    "RetryPolicy",
    "build_request",
    "parse_mix",
]
