"""Turns one scheduled step into one ragged forward pass of a `transformers` causal LM.

All sequences of the step are flattened into a single row of T tokens: the model sees batch size 1,
explicit positions (restarting at each sequence's offset, so RoPE is right), `use_cache=False` (our
attention owns the KV cache) and `logits_to_keep` naming only the tokens whose next token is sampled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from services.inference.engine.attention.context import AttentionMetadata
from services.inference.engine.kv_cache import PagedKVCache
from services.inference.engine.scheduler import SchedulerOutput
from services.inference.engine.sequence import Sequence


@dataclass
class StepBatch:
    """T = tokens in the step, S = sequences that sample a token this step."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64: position of each token within its own sequence
    logits_indices: torch.Tensor  # [S] int64: index in T of each sampling sequence's last token
    attention: AttentionMetadata
    sampling_seqs: list[Sequence]  # S, in the order of logits_indices

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class ModelRunner:
    def __init__(self, model: Any, kv_cache: PagedKVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.spec.block_size

    def prepare(self, out: SchedulerOutput) -> StepBatch:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        query_lens: list[int] = []
        context_lens: list[int] = []
        logits_indices: list[int] = []
        sampling_seqs: list[Sequence] = []
        max_blocks = max(len(c.seq.block_table) for c in out.chunks)
        block_tables: list[list[int]] = []
        for chunk in out.chunks:
            seq = chunk.seq
            end = chunk.start + chunk.num_new_tokens
            table = seq.block_table
            input_ids.extend(seq.token_ids[chunk.start : end])
            positions.extend(range(chunk.start, end))
            slots.extend(table[p // bs] * bs + p % bs for p in range(chunk.start, end))
            cu_seqlens.append(cu_seqlens[-1] + chunk.num_new_tokens)
            query_lens.append(chunk.num_new_tokens)
            context_lens.append(end)
            block_tables.append(table + [0] * (max_blocks - len(table)))
            if chunk.samples:
                logits_indices.append(cu_seqlens[-1] - 1)
                sampling_seqs.append(seq)

        def tensor(data: list[int] | list[list[int]], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(data, dtype=dtype, device=self.device)

        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=tensor(slots, torch.long),
            cu_seqlens_q=tensor(cu_seqlens, torch.int32),
            seq_lens=tensor(context_lens, torch.int32),
            block_tables=tensor(block_tables, torch.int32),
            query_lens=query_lens,
            context_lens=context_lens,
        )
        return StepBatch(
            input_ids=tensor(input_ids, torch.long),
            positions=tensor(positions, torch.long),
            logits_indices=tensor(logits_indices, torch.long),
            attention=meta,
            sampling_seqs=sampling_seqs,
        )

    @torch.inference_mode()
    def execute(self, batch: StepBatch) -> torch.Tensor:
        """Run the step; return the logits `[S, vocab]` of the sampling sequences (S may be 0), in the
        model's dtype: greedy rows need only their argmax, and the sampler upcasts the rows that need more."""
        if not batch.sampling_seqs:
            # Only partial prefills: their K/V must still be written, but no logits are needed.
            keep: torch.Tensor | int = batch.logits_indices.new_tensor([batch.num_tokens - 1])
        else:
            keep = batch.logits_indices
        output = self.model(
            input_ids=batch.input_ids[None],
            position_ids=batch.positions[None],
            use_cache=False,
            logits_to_keep=keep,
            openlora_step=batch.attention,
        )
        logits: torch.Tensor = output.logits[0]  # [S, vocab]
        return logits[: len(batch.sampling_seqs)]
