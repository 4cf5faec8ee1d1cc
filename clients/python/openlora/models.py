"""What `list_models()` returns: the base model a worker serves and the adapters its cache holds."""

from __future__ import annotations

from dataclasses import dataclass

from openlora.v1 import inference_pb2


@dataclass(frozen=True)
class BaseModel:
    name: str
    dtype: str
    """`float32`, `bfloat16` or `float16`."""
    max_context: int
    """Longest prompt + generation accepted, in tokens."""
    quantization: str


@dataclass(frozen=True)
class CachedAdapter:
    id: str
    version: str
    digest: str
    tier: str
    """The fastest tier holding it: `device`, `host` or `disk`."""
    rank: int
    size_bytes: int


@dataclass(frozen=True)
class EngineStats:
    running_requests: int
    waiting_requests: int
    kv_blocks_total: int
    kv_blocks_used: int


@dataclass(frozen=True)
class Models:
    base_model: BaseModel
    adapters: tuple[CachedAdapter, ...]
    """Fastest tier first."""
    attention_backend: str
    lora_op: str
    worker_id: str
    """The worker that answered (through a gateway, one of them)."""
    stats: EngineStats

    @classmethod
    def from_proto(cls, reply: inference_pb2.ListModelsResponse) -> Models:
        base = reply.base_model
        return cls(
            base_model=BaseModel(base.name, base.dtype, base.max_context, base.quantization),
            adapters=tuple(
                CachedAdapter(
                    id=a.adapter.id,
                    version=a.adapter.version,
                    digest=a.digest,
                    tier=inference_pb2.CacheTier.Name(a.tier).lower(),
                    rank=a.rank,
                    size_bytes=a.size_bytes,
                )
                for a in reply.adapters
            ),
            attention_backend=reply.attention_backend,
            lora_op=reply.lora_op,
            worker_id=reply.worker_id,
            stats=EngineStats(
                reply.stats.running_requests,
                reply.stats.waiting_requests,
                reply.stats.kv_blocks_total,
                reply.stats.kv_blocks_used,
            ),
        )
