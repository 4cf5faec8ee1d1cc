"""Per-step attention metadata: what every attention layer needs to know about the ragged batch.

The model runner builds one `AttentionMetadata` per step and passes it to the model's `forward` as the
`openlora_step` keyword; transformers hands it untouched to our registered attention function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from services.inference.engine.kv_cache import PagedKVCache


@dataclass
class AttentionMetadata:
    """T = tokens in the step, B = sequences in the step, M = most blocks any of them holds."""

    kv_cache: PagedKVCache
    slot_mapping: torch.Tensor  # [T] int64: the KV slot each new token's key and value go to
    cu_seqlens_q: torch.Tensor  # [B + 1] int32: where each sequence's new tokens start in T
    seq_lens: torch.Tensor  # [B] int32: context length of each sequence once this step is done
    block_tables: torch.Tensor  # [B, M] int32: block ids per sequence, padded with 0
    query_lens: list[int]  # B: new tokens per sequence
    context_lens: list[int]  # B: same as seq_lens, on the host
    backend_state: dict[str, Any] = field(default_factory=dict)
    """Whatever the backend derives once per step and reuses in every layer (indices, masks)."""

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens)

    @property
    def max_context_len(self) -> int:
        return max(self.context_lens)
