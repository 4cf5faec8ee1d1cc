"""Requests and replies in plain Python: what a caller passes and what a stream yields."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from services.common.proto import common_pb2, inference_pb2

STRATEGIES = {
    "linear": common_pb2.LINEAR,
    "ties": common_pb2.TIES,
    "dare_linear": common_pb2.DARE_LINEAR,
    "dare_ties": common_pb2.DARE_TIES,
}
FINISH_REASONS = {
    inference_pb2.STOP: "stop",
    inference_pb2.LENGTH: "length",
    inference_pb2.CANCELLED: "cancelled",
}


@dataclass(frozen=True)
class MixComponent:
    adapter: str
    """`id` (latest version) or `id@version`."""
    weight: float


def parse_mix(text: str) -> list[MixComponent]:
    """`id:w,id:w` (as the CLI takes it) → components; a ValueError names the bad part."""
    components = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        adapter, sep, weight = part.rpartition(":")
        if not sep or not adapter:
            raise ValueError(f"mix component {part!r} is not ID:WEIGHT")
        try:
            components.append(MixComponent(adapter, float(weight)))
        except ValueError:
            raise ValueError(f"mix component {part!r}: {weight!r} is not a number") from None
    if not components:
        raise ValueError("a mix needs at least one ID:WEIGHT")
    return components


def _ref(adapter: str) -> common_pb2.AdapterRef:
    # A source URI (hf://org/repo@rev) keeps its `@`: the revision belongs to the URI.
    if "://" in adapter:
        return common_pb2.AdapterRef(id=adapter)
    adapter_id, _, version = adapter.partition("@")
    return common_pb2.AdapterRef(id=adapter_id, version=version)


def build_request(
    prompt: str | Sequence[int],
    *,
    adapter: str | None = None,
    mix: Iterable[MixComponent] | None = None,
    strategy: str = "linear",
    density: float = 0.0,
    rank: int = 0,
    mix_seed: int = 0,
    max_new_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop: Sequence[str] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
    request_id: str | None = None,
) -> inference_pb2.GenerateRequest:
    """Zero values mean the server's defaults (see `SamplingParams` in the proto)."""
    if adapter is not None and mix is not None:
        raise ValueError("give either adapter or mix, not both")
    request = inference_pb2.GenerateRequest(
        request_id=request_id or uuid.uuid4().hex,
        sampling=common_pb2.SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            max_new_tokens=max_new_tokens,
            stop=list(stop),
            ignore_eos=ignore_eos,
        ),
        return_logprobs=logprobs,
    )
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.token_ids.ids.extend(prompt)
    if adapter is not None:
        request.adapter_ref.CopyFrom(_ref(adapter))
    if mix is not None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        request.mix.CopyFrom(
            common_pb2.AdapterMix(
                components=[common_pb2.Component(adapter=_ref(c.adapter), weight=c.weight) for c in mix],
                strategy=STRATEGIES[strategy],
                density=density,
                rank=rank,
                seed=mix_seed,
            )
        )
    return request


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    """`stop`, `length` or `cancelled` on the last chunk."""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_proto(cls, chunk: inference_pb2.GenerateChunk) -> Chunk:
        return cls(
            text=chunk.text,
            token_ids=list(chunk.token_ids),
            logprobs=list(chunk.logprobs),
            finish_reason=FINISH_REASONS.get(chunk.finish_reason),
            prompt_tokens=chunk.usage.prompt_tokens,
            completion_tokens=chunk.usage.completion_tokens,
        )


@dataclass
class Completion:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, chunk: Chunk) -> None:
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.prompt_tokens, self.completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
