"""Requests and replies in plain Python: what a caller passes and what a stream yields."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict, Unpack

from openlora.adapters import adapter_ref
from openlora.v1 import common_pb2, inference_pb2

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


class GenerateOptions(TypedDict, total=False):
    """Options of `stream()` and `generate()`. Zero values mean the server's defaults."""

    adapter: str | None
    """`id`, `id@version` or an allowed source URI (hf://, s3://, https://); none: the base model."""
    mix: Iterable[MixComponent] | None
    """A per-request merge of adapters instead of `adapter`; usage is credited by weight."""
    strategy: str
    """How a mix merges: `linear` (exact), `ties`, `dare_linear` or `dare_ties`."""
    density: float
    """TIES/DARE: the fraction of each delta kept, in (0, 1]."""
    rank: int
    """TIES/DARE: the merged rank (0: the largest component's)."""
    mix_seed: int
    """DARE's random drop seed."""
    max_new_tokens: int
    temperature: float
    """0: greedy."""
    top_p: float
    top_k: int
    seed: int
    """Sampling seed: the same seed gives the same output."""
    stop: Sequence[str]
    """Strings that end the generation (not included in the text)."""
    ignore_eos: bool
    logprobs: bool
    """Return each generated token's log-probability."""
    top_logprobs: int
    """With `logprobs`: also the most likely tokens at each position (up to 20)."""
    frequency_penalty: float
    """In [-2, 2]: lowers a token's logit per time it already appears in the output."""
    presence_penalty: float
    """In [-2, 2]: lowers a token's logit once it appears in the output."""
    repetition_penalty: float
    """> 0 (1: off): transformers' penalty on tokens of the prompt and the output."""
    min_p: float
    """In [0, 1]: drops tokens below min_p x the most likely token's probability."""
    logit_bias: Mapping[int, float]
    """Token id → bias added to its logit, in [-100, 100]."""
    n: int
    """Samples of the prompt (up to 16; `stream()` only: each chunk says its sample's `index`)."""
    request_id: str | None
    """Your id for the request (idempotent billing, logs); a fresh one when absent."""


Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
"""Text, token ids, or a conversation (`{"role": ..., "content": ...}` turns, rendered on the
worker with the model's chat template)."""


def build_request(prompt: Prompt, **options: Unpack[GenerateOptions]) -> inference_pb2.GenerateRequest:
    """The wire request for a text prompt, a prompt of token ids or a conversation."""
    adapter, mix = options.get("adapter"), options.get("mix")
    if adapter is not None and mix is not None:
        raise ValueError("give either adapter or mix, not both")
    request = inference_pb2.GenerateRequest(
        request_id=options.get("request_id") or uuid.uuid4().hex,
        sampling=common_pb2.SamplingParams(
            temperature=options.get("temperature", 0.0),
            top_p=options.get("top_p", 0.0),
            top_k=options.get("top_k", 0),
            seed=options.get("seed", 0),
            max_new_tokens=options.get("max_new_tokens", 0),
            stop=list(options.get("stop", ())),
            ignore_eos=options.get("ignore_eos", False),
            frequency_penalty=options.get("frequency_penalty", 0.0),
            presence_penalty=options.get("presence_penalty", 0.0),
            repetition_penalty=options.get("repetition_penalty", 0.0),
            min_p=options.get("min_p", 0.0),
            logit_bias=dict(options.get("logit_bias", {})),
            n=options.get("n", 0),
        ),
        return_logprobs=options.get("logprobs", False),
        top_logprobs=options.get("top_logprobs", 0),
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and isinstance(prompt[0], Mapping):
        for turn in prompt:
            assert isinstance(turn, Mapping)
            request.messages.messages.add(role=turn["role"], content=turn["content"])
    else:
        request.token_ids.ids.extend(int(t) for t in prompt)  # type: ignore[arg-type]
    if adapter is not None:
        request.adapter_ref.CopyFrom(adapter_ref(adapter))
    if mix is not None:
        strategy = options.get("strategy", "linear")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}: use one of {', '.join(STRATEGIES)}")
        request.mix.CopyFrom(
            common_pb2.AdapterMix(
                components=[
                    common_pb2.Component(adapter=adapter_ref(c.adapter), weight=c.weight) for c in mix
                ],
                strategy=STRATEGIES[strategy],
                density=options.get("density", 0.0),
                rank=options.get("rank", 0),
                seed=options.get("mix_seed", 0),
            )
        )
    return request


def one_sample(options: GenerateOptions) -> None:
    """`generate()` assembles one completion: several samples are for `stream()`."""
    if options.get("n", 1) > 1:
        raise ValueError("generate() returns one completion: use stream() for n > 1 (chunks carry index)")


@dataclass(frozen=True)
class Chunk:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str | None = None
    """`stop`, `length` or `cancelled` on the last chunk."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    index: int = 0
    """The sample it belongs to (with `n` > 1)."""

    @classmethod
    def from_proto(cls, chunk: inference_pb2.GenerateChunk) -> Chunk:
        return cls(
            text=chunk.text,
            token_ids=list(chunk.token_ids),
            logprobs=list(chunk.logprobs),
            finish_reason=FINISH_REASONS.get(chunk.finish_reason),
            prompt_tokens=chunk.usage.prompt_tokens,
            completion_tokens=chunk.usage.completion_tokens,
            index=chunk.index,
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
