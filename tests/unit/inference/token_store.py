"""A pure-Python stand-in for the model runner, so scheduling is tested without torch.

`TokenStore` is a KV cache that stores token ids instead of tensors: each step writes every scheduled
token into the slot its block table names, and a sampling sequence reads its whole context back
through its block table. A wrong block table, a bad prefix hit or a reused block that was still in
use shows up as a context that differs from the sequence's tokens. The "model" is a hash of the
context, so the same prompt gives the same continuation however it was batched, chunked or preempted.
"""

from __future__ import annotations

from collections.abc import Callable

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from services.inference.engine.sequence import SamplingParams, Sequence

VOCAB = 97


def next_token(context: list[int]) -> int:
    """Deterministic stand-in for a model's greedy choice; never 0, which tests use as EOS."""
    return 1 + hash(tuple(context)) % (VOCAB - 1)


def reference_output(prompt: list[int], max_new_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


class TokenStore:
    def __init__(self, block_manager: BlockManager) -> None:
        self.bm = block_manager
        self.slots: list[int | None] = [None] * (block_manager.num_blocks * block_manager.block_size)

    def _slot(self, seq: Sequence, pos: int) -> int:
        bs = self.bm.block_size
        return seq.block_table[pos // bs] * bs + pos % bs

    def run(self, out: SchedulerOutput) -> list[int]:
        sampled: list[int] = []
        for chunk in out.chunks:
            seq = chunk.seq
            assert chunk.start == seq.num_computed_tokens, "chunks must continue where the KV ends"
            end = chunk.start + chunk.num_new_tokens
            assert len(seq.block_table) * self.bm.block_size >= end, "block table too short"
            for pos in range(chunk.start, end):
                slot = self._slot(seq, pos)
                # A slot of a shared (prefix-cached) block is never rewritten with other content.
                if self.bm.ref_count(seq.block_table[pos // self.bm.block_size]) > 1:
                    assert self.slots[slot] == seq.token_ids[pos]
                self.slots[slot] = seq.token_ids[pos]
            if chunk.samples:
                context = [self.slots[self._slot(seq, p)] for p in range(end)]
                assert context == seq.token_ids[:end], f"{seq.request_id} reads a corrupt context"
                sampled.append(next_token(seq.token_ids[:end]))
        return sampled


class Harness:
    """A scheduler, its block manager and a token store, stepped like the engine steps them."""

    def __init__(
        self,
        num_blocks: int = 16,
        block_size: int = 4,
        *,
        max_num_seqs: int = 8,
        max_num_batched_tokens: int = 32,
        max_prefill_chunk: int | None = None,
        prefix_caching: bool = True,
        adapter_ready: Callable[[Sequence], bool] | None = None,
    ) -> None:
        self.bm = BlockManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
        config = SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_prefill_chunk=max_prefill_chunk,
            eos_token_ids=(0,),
        )
        self.scheduler = Scheduler(config, self.bm, adapter_ready=adapter_ready)
        self.store = TokenStore(self.bm)
        self.steps = 0

    def add(self, request_id: str, prompt: list[int], max_new_tokens: int = 4, **kw: object) -> Sequence:
        seq = Sequence(request_id, prompt, SamplingParams(max_new_tokens=max_new_tokens), **kw)  # type: ignore[arg-type]
        self.scheduler.add(seq)
        return seq

    def step(self) -> SchedulerOutput:
        out = self.scheduler.schedule()
        assert out.num_batched_tokens <= self.scheduler.config.max_num_batched_tokens
        assert len(out.chunks) <= self.scheduler.config.max_num_seqs
        assert len({c.seq.seq_id for c in out.chunks}) == len(out.chunks)
        self.scheduler.postprocess(out, self.store.run(out))
        self.steps += 1
        self.check()
        return out

    def check(self) -> None:
        """Reference counts equal the number of live block tables naming each block."""
        self.bm.check_consistency()
        expected = [0] * self.bm.num_blocks
        for seq in self.scheduler.running:
            for block in seq.block_table:
                expected[block] += 1
        for seq in self.scheduler.waiting:
            assert not seq.block_table, "a waiting sequence holds no blocks"
        assert [self.bm.ref_count(b) for b in range(self.bm.num_blocks)] == expected

    def run_until_done(self, max_steps: int = 1000) -> None:
        while self.scheduler.has_unfinished():
            self.step()
            assert self.steps < max_steps, "no progress"
