"""The `openlora.v1.Inference` servicer: protobuf → checked request → service → protobuf."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Callable
from typing import Any

from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.common.contracts import SERVICE_NAMES
from services.common.grpc_server import ServiceBinding
from services.common.trust.caller import caller_role
from services.inference.chunks import Chunk
from services.inference.engine.sequence import FinishReason
from services.inference.prompts import Prompter
from services.inference.relay_server import StreamSink
from services.inference.service import WorkerService
from services.inference.validation import ParsedRequest, parse_request

_TIERS = {"device": inference_pb2.DEVICE, "host": inference_pb2.HOST, "disk": inference_pb2.DISK}
_FINISH = {
    FinishReason.STOP: inference_pb2.STOP,
    FinishReason.LENGTH: inference_pb2.LENGTH,
    FinishReason.CANCELLED: inference_pb2.CANCELLED,
}


class InferenceServicer(inference_pb2_grpc.InferenceServicer):
    def __init__(
        self,
        service: WorkerService,
        prompter: Prompter | None,
        *,
        default_tenant: str | None = None,
    ) -> None:
        self.service = service
        self.default_tenant = default_tenant
        self.prompter = prompter

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> AsyncGenerator[inference_pb2.GenerateChunk]:
        parsed = self._parse(request)
        async with contextlib.aclosing(self.service.generate(parsed)) as chunks:
            async for chunk in chunks:
                yield to_message(chunk)

    async def serve(self, request: inference_pb2.GenerateRequest, context: Any, sink: StreamSink) -> None:
        """`Generate` for a stream on the gateway's relay: chunks go to `sink` as the engine steps."""
        parsed = self._parse(request)
        await self.service.serve(parsed, _MessageSink(sink))

    def _parse(self, request: inference_pb2.GenerateRequest) -> ParsedRequest:
        # The caller is the role the server kit authenticated (streams on the gateway's relay call
        # run in tasks that call started, so they see the gateway's role).
        return parse_request(
            request,
            self.service.limits,
            self.prompter,
            caller=caller_role.get(),
            default_tenant=self.default_tenant,
        )

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Any
    ) -> inference_pb2.ListModelsResponse:
        listing = self.service.list_models()
        model = listing.model
        reply = inference_pb2.ListModelsResponse(
            base_model=inference_pb2.ModelInfo(
                name=model.name,
                dtype=model.dtype,
                max_context=model.max_context,
                quantization=model.quantization,
            ),
            attention_backend=model.attention_backend,
            lora_op=model.lora_op,
            worker_id=listing.worker_id,
            adapters=[
                inference_pb2.CachedAdapter(
                    adapter=common_pb2.AdapterRef(id=a.id, version=a.version),
                    digest=a.digest,
                    tier=_TIERS[a.tier],
                    rank=a.rank,
                    size_bytes=a.size_bytes,
                )
                for a in listing.adapters
            ],
        )
        if (stats := listing.stats) is not None:
            reply.stats.running_requests = stats.num_running
            reply.stats.waiting_requests = stats.num_waiting
            reply.stats.kv_blocks_total = stats.num_kv_blocks
            reply.stats.kv_blocks_used = stats.num_kv_blocks - stats.num_free_kv_blocks
        return reply


def to_message(chunk: Chunk) -> inference_pb2.GenerateChunk:
    message = inference_pb2.GenerateChunk(token_ids=chunk.token_ids, text=chunk.text, logprobs=chunk.logprobs)
    if chunk.index:
        message.index = chunk.index
    if chunk.token_bytes:
        message.token_bytes.extend(chunk.token_bytes)
    for ids, values, pieces in chunk.top_logprobs:
        message.top_logprobs.add(token_ids=ids, logprobs=values, token_bytes=pieces)
    if chunk.finish_reason is not None:
        message.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.last:
        message.usage.prompt_tokens = chunk.prompt_tokens
        message.usage.completion_tokens = chunk.completion_tokens
    return message


class _MessageSink:
    """The service's chunks as `GenerateChunk` messages, to the relay's stream."""

    __slots__ = ("_sink",)

    def __init__(self, sink: StreamSink) -> None:
        self._sink = sink

    @property
    def writable(self) -> bool:
        return self._sink.writable

    def send(self, chunk: Chunk) -> None:
        self._sink.send(to_message(chunk))

    def on_writable(self, callback: Callable[[], None]) -> None:
        self._sink.on_writable(callback)


def binding(servicer: inference_pb2_grpc.InferenceServicer) -> ServiceBinding:
    return ServiceBinding(
        name=SERVICE_NAMES["inference"],
        attach=lambda server: inference_pb2_grpc.add_InferenceServicer_to_server(servicer, server),
    )
