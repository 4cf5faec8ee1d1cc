"""Iteration-level scheduling: which sequences run in the next step, and how many tokens each.

Every step first serves the running sequences, oldest first (decodes take one token, unfinished
prefills take a chunk), then admits waiting ones in arrival order while the token budget, the
sequence cap and the free KV blocks allow. When a running sequence needs a block and none is free,
the newest running sequence is preempted: its blocks are freed and it goes back to the front of the
queue to be recomputed later (prefix caching usually makes that cheap).

Plain Python: no torch, no I/O; `llm_engine.py` turns a `SchedulerOutput` into a model call.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.sequence import FinishReason, Sequence, SequenceStatus, TopLogprobs

AdapterReady = Callable[[Sequence], bool]
"""Whether a waiting sequence's adapter is resident. The multi-LoRA cache supplies it (and may start
the load when asked); a sequence whose adapter is not ready waits in LOADING without blocking others."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    """Most sequences in one step."""
    max_num_batched_tokens: int = 512
    """Token budget of one step: decodes plus prefill chunks."""
    max_prefill_chunk: int | None = None
    """Most prompt tokens one sequence may prefill in one step; None means the whole budget."""
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_prefill_chunk is not None and self.max_prefill_chunk < 1:
            raise ValueError("max_prefill_chunk must be >= 1")


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_new_tokens` tokens of `seq`, from position `start`, computed in this step."""

    seq: Sequence
    start: int
    num_new_tokens: int
    samples: bool
    """True when the chunk reaches the sequence's last token: the step then yields its next token."""


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        adapter_ready: AdapterReady | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.adapter_ready = adapter_ready
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.block_manager.block_size

    def add(self, seq: Sequence) -> None:
        if seq.status is not SequenceStatus.WAITING or seq.block_table:
            raise ValueError(f"sequence {seq.request_id} is not new")
        # A sequence that cannot fit alone would be preempted forever.
        if seq.max_total_tokens > self.capacity_tokens:
            raise ValueError(
                f"prompt + max_new_tokens = {seq.max_total_tokens} tokens exceeds the KV cache "
                f"({self.capacity_tokens} tokens)"
            )
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Sequence | None:
        """Cancel a request wherever it is; its blocks are free when this returns."""
        for seq in self.running:
            if seq.request_id == request_id:
                self.running.remove(seq)
                self._finish(seq, FinishReason.CANCELLED)
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                self._finish(seq, FinishReason.CANCELLED)
                return seq
        return None

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._admit_waiting(out, budget)
        return out

    def _chunk_limit(self, budget: int) -> int:
        limit = self.config.max_prefill_chunk
        return budget if limit is None else min(budget, limit)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        bm = self.block_manager
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, self._chunk_limit(budget))
            target = seq.num_computed_tokens + num_new
            while not bm.can_grow(seq, target):
                victim = self.running.pop()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            bm.grow(seq, target)
            out.chunks.append(self._chunk(seq, num_new))
            budget -= num_new
            i += 1
        return budget

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> None:
        bm = self.block_manager
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if self.adapter_ready is not None and not self.adapter_ready(seq):
                seq.status = SequenceStatus.LOADING
                skipped.append(self.waiting.popleft())
                continue
            if _waits_for_sibling(seq):
                skipped.append(self.waiting.popleft())
                continue
            hits = bm.lookup_prefix(seq)
            num_new = min(seq.num_tokens - len(hits) * bm.block_size, self._chunk_limit(budget))
            target = len(hits) * bm.block_size + num_new
            # Stop at the first request that does not fit: admitting smaller ones behind it would
            # starve long prompts.
            if not bm.allocate(seq, hits, target):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(self._chunk(seq, num_new))
            budget -= num_new
        # Loading sequences keep their place at the head of the queue, in arrival order.
        self.waiting.extendleft(reversed(skipped))

    def _chunk(self, seq: Sequence, num_new: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return ScheduledChunk(seq, start, num_new, samples=start + num_new == seq.num_tokens)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(
        self,
        out: SchedulerOutput,
        sampled: list[int],
        logprobs: list[float] | None = None,
        top_logprobs: list[TopLogprobs | None] | None = None,
    ) -> list[Sequence]:
        """Record a finished step: `sampled[i]` is the token of the i-th chunk with `samples` set.

        Returns the sequences that received a token, in chunk order; finished ones have released
        their blocks.
        """
        sampling_chunks = [c for c in out.chunks if c.samples]
        if len(sampled) != len(sampling_chunks):
            raise ValueError(f"{len(sampled)} tokens for {len(sampling_chunks)} sampling chunks")
        for chunk in out.chunks:
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # cancelled while the step ran
            seq.num_computed_tokens = chunk.start + chunk.num_new_tokens
            if chunk.start < seq.num_prompt_tokens:  # a prefill chunk (decodes start past the prompt)
                seq.took_prompt_tokens()
            self.block_manager.cache_full_blocks(seq)
        updated: list[Sequence] = []
        for j, chunk in enumerate(sampling_chunks):
            seq = chunk.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue
            token = sampled[j]
            seq.append_token(
                token,
                None if logprobs is None else logprobs[j],
                None if top_logprobs is None else top_logprobs[j],
            )
            updated.append(seq)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
        return updated

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a running sequence for a reason found outside the scheduler (a stop string)."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._finish(seq, reason)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        params = seq.sampling
        if token in params.stop_token_ids or (not params.ignore_eos and token in self.config.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason


def _waits_for_sibling(seq: Sequence) -> bool:
    """A sample whose sibling (same prompt, queued first) has not computed its prompt yet waits for
    those blocks to be cached; once the sibling has, or is gone, it goes its own way."""
    sibling = seq.after
    if sibling is None:
        return False
    if sibling.status is not SequenceStatus.FINISHED and not sibling.prefill_done:
        return True
    seq.after = None  # from now on an ordinary request (a preemption recomputes it on its own)
    return False
