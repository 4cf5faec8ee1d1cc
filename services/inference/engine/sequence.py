"""One request's life in the engine: its tokens, how many of them sit in the KV cache, its blocks."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from services.inference.engine.output_format import Constraint


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    # Waiting for its adapter to become resident; the scheduler skips it without stalling others.
    LOADING = "loading"
    RUNNING = "running"
    FINISHED = "finished"


TopLogprobs = tuple[list[int], list[float]]
"""The most likely tokens at one position and their log-probabilities, most likely first."""


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen and when generation ends (mirrors `openlora.v1.SamplingParams`)."""

    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 means no top-k cut."""
    seed: int | None = None
    """Same seed, same prompt → same output, whatever else shares the batch."""
    max_new_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends right before the first one found (needs the engine's tokenizer)."""
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    """With `logprobs`: also the most likely alternatives at each position (under the model)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit per time it already appears in the output (OpenAI)."""
    presence_penalty: float = 0.0
    """Subtracted from a token's logit once it appears in the output at all (OpenAI)."""
    repetition_penalty: float = 1.0
    """Divides the positive logits (multiplies the negative ones) of tokens already in the prompt
    or output, as `transformers`' RepetitionPenaltyLogitsProcessor does; 1 is off."""
    min_p: float = 0.0
    """Drops tokens below `min_p` x the top token's probability (after temperature, top-k, top-p)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before anything else."""
    constraint: Constraint | None = None
    """A format the output must follow (JSON, a schema, a regex, a grammar), masked token by token."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        if not 0 <= self.min_p <= 1:
            raise ValueError("min_p must be in [0, 1]")
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must be >= 0")

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits change before the choice (so even a greedy row needs more than argmax)."""
        return bool(
            self.logit_bias
            or self.repetition_penalty != 1.0
            or self.frequency_penalty
            or self.presence_penalty
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


_next_seq_id = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Prompt plus generated tokens; `num_computed_tokens` of them have their K/V in `block_table`.

    A preempted sequence drops its blocks and resets `num_computed_tokens` to 0; its output tokens are
    kept and re-prefilled with the prompt when it is admitted again (recompute, not swap).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapter_key: str | None = None
    """Identity of the weights that produce this sequence's K/V (None = base model). It salts the
    prefix-cache hash chain: the same prompt under two adapters has different K/V."""
    seq_id: int = field(default_factory=lambda: next(_next_seq_id))
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Tokens of the last admission served from the prefix cache (for metrics and tests)."""
    num_prompt_tokens_taken: int = 0
    """The most prompt tokens this sequence ever had K/V for, computed or found cached (a preemption
    does not lower it): what a request cancelled before its first token reached the client is billed
    for its prompt."""
    block_table: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    after: Sequence | None = None
    """Another sample of the same prompt: this one waits until that one's prompt is computed, so
    its blocks come from the prefix cache rather than a second prefill."""

    @property
    def prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        # Kept alongside the two parts so every step reads it without concatenating.
        self._token_ids = [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def token_ids(self) -> list[int]:
        """Prompt then output tokens; read-only by convention (shared, not copied)."""
        return self._token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def max_total_tokens(self) -> int:
        """The most tokens this sequence can ever hold: the KV it may need at its longest."""
        return self.num_prompt_tokens + self.sampling.max_new_tokens

    def took_prompt_tokens(self) -> None:
        """Raise `num_prompt_tokens_taken` to what `num_computed_tokens` now covers of the prompt."""
        taken = min(self.num_computed_tokens, self.num_prompt_tokens)
        if taken > self.num_prompt_tokens_taken:
            self.num_prompt_tokens_taken = taken

    def append_token(
        self, token_id: int, logprob: float | None = None, top: TopLogprobs | None = None
    ) -> None:
        self.output_token_ids.append(token_id)
        self._token_ids.append(token_id)
        if logprob is not None:
            self.output_logprobs.append(logprob)
        if top is not None:
            self.output_top_logprobs.append(top)
