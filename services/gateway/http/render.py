"""Worker chunks (`GenerateChunk`) → OpenAI response objects, streamed or whole.

One `Rendering` per request keeps what its objects share (id, creation time, the model as the client
named it, chat or text) and renders each chunk as a stream event, or accumulates them into the
single response of a non-streaming call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from openlora.v1 import common_pb2, inference_pb2

_FINISH = {inference_pb2.STOP: "stop", inference_pb2.LENGTH: "length", inference_pb2.CANCELLED: "abort"}


def _token(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(chunk: inference_pb2.GenerateChunk) -> dict[str, Any]:
    """`logprobs.content` of a chat choice: each token with its bytes and alternatives."""
    content = []
    for i, (logprob, piece) in enumerate(zip(chunk.logprobs, chunk.token_bytes, strict=False)):
        entry: dict[str, Any] = {"token": _token(piece), "logprob": logprob, "bytes": list(piece)}
        alternatives = chunk.top_logprobs[i] if i < len(chunk.top_logprobs) else None
        entry["top_logprobs"] = (
            [
                {"token": _token(p), "logprob": lp, "bytes": list(p)}
                for p, lp in zip(alternatives.token_bytes, alternatives.logprobs, strict=False)
            ]
            if alternatives is not None
            else []
        )
        content.append(entry)
    return {"content": content}


def text_logprobs(chunk: inference_pb2.GenerateChunk, offset: int) -> dict[str, Any]:
    """`logprobs` of a text completion choice (the legacy shape: parallel lists)."""
    tokens = [_token(p) for p in chunk.token_bytes]
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token)
    top = [
        {_token(p): lp for p, lp in zip(alt.token_bytes, alt.logprobs, strict=False)}
        for alt in chunk.top_logprobs
    ]
    return {
        "tokens": tokens,
        "token_logprobs": list(chunk.logprobs),
        "top_logprobs": top or None,
        "text_offset": offsets,
    }


@dataclass
class Rendering:
    request_id: str
    model: str
    chat: bool
    logprobs: bool
    created: int = field(default_factory=lambda: int(time.time()))
    text_offsets: dict[int, int] = field(default_factory=dict)  # per sample: text sent so far
    opened: set[int] = field(default_factory=set)  # samples whose chat stream sent the role

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.chat else 'cmpl'}-{self.request_id}"

    def _envelope(self, choices: list[dict[str, Any]], streamed: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if streamed else "chat.completion"
        else:
            kind = "text_completion"
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def stream_events(self, chunk: inference_pb2.GenerateChunk) -> list[dict[str, Any]]:
        """The stream events of one chunk (the chat stream opens with the assistant's role)."""
        finish = _FINISH.get(chunk.finish_reason)
        index = chunk.index
        opened = index in self.opened
        if not chunk.token_ids and finish is None and opened:
            return []
        choice: dict[str, Any] = {"index": index, "finish_reason": finish}
        if self.chat:
            delta: dict[str, Any] = {"content": chunk.text} if chunk.text or not opened else {}
            if not opened:
                delta = {"role": "assistant", **delta}
            choice["delta"] = delta
            choice["logprobs"] = chat_logprobs(chunk) if self.logprobs and chunk.token_ids else None
        else:
            offset = self.text_offsets.get(index, 0)
            choice["text"] = chunk.text
            choice["logprobs"] = text_logprobs(chunk, offset) if self.logprobs else None
            self.text_offsets[index] = offset + len(chunk.text)
        self.opened.add(index)
        return [self._envelope([choice], streamed=True)]

    def usage_event(self, usage: common_pb2.Usage) -> dict[str, Any]:
        """The last event of a stream with `include_usage`: no choices, the request's usage."""
        event = self._envelope([], streamed=True)
        event["usage"] = usage_object(usage)
        return event

    def response(self, chunks: list[inference_pb2.GenerateChunk]) -> dict[str, Any]:
        """The whole response of a non-streaming call: a choice per sample."""
        samples: dict[int, inference_pb2.GenerateChunk] = {}
        usage = common_pb2.Usage()
        for chunk in chunks:
            merged = samples.setdefault(chunk.index, inference_pb2.GenerateChunk(index=chunk.index))
            merged.token_ids.extend(chunk.token_ids)
            merged.text += chunk.text
            merged.logprobs.extend(chunk.logprobs)
            merged.top_logprobs.extend(chunk.top_logprobs)
            merged.token_bytes.extend(chunk.token_bytes)
            if chunk.finish_reason:
                merged.finish_reason = chunk.finish_reason
            if chunk.HasField("usage"):
                usage = chunk.usage
        body = self._envelope([self._choice(samples[i]) for i in sorted(samples)], streamed=False)
        body["usage"] = usage_object(usage)
        return body

    def _choice(self, sample: inference_pb2.GenerateChunk) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": sample.index, "finish_reason": _FINISH.get(sample.finish_reason)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": sample.text}
            choice["logprobs"] = chat_logprobs(sample) if self.logprobs else None
        else:
            choice["text"] = sample.text
            choice["logprobs"] = text_logprobs(sample, 0) if self.logprobs else None
        return choice


def usage_object(usage: common_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
