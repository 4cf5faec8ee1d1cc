"""The `torch` attention backend: SDPA over K/V gathered from the paged cache (CPU and any GPU).

Semantics, for each layer and each sequence b of the step:

    cache[slot_mapping[t]] = k[t], v[t]                 for every new token t
    keys_b = cache[slot(b, j)] for j < seq_lens[b]       (slot from the block table)
    out[t] = softmax(q[t] · keys_bᵀ · scale + mask) · values_b, mask causal (and windowed)

Decoding sequences (one new token) and prefilling ones run as two padded SDPA calls, so a long
prompt chunk never pads every decode row to its length. Gather indices and masks are built once per
step and shared by every layer.

Two layout choices make the CPU path fast (measured on SmolLM2's shape, 32 decodes of ~400 tokens):
K/V are gathered a whole block at a time (one `index_select` row = `block_size` tokens, ~4x faster
than per-token rows; keys past a sequence's end are masked), and the query heads that share a KV head
are folded into the query-length axis ([G, Hkv, group·Q, D]) so SDPA runs without `enable_gqa`,
which expands K/V per query head (~2x faster in fp32, ~5x in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from services.inference.engine.attention.context import AttentionMetadata

NAME = "openlora_torch"


@dataclass
class _Group:
    """G = sequences in the group, Q = their longest query, M = most blocks one of them reads, K = M·block."""

    q_index: torch.Tensor  # [G, Q] int64: index in T of each query row (padding → 0)
    q_valid: torch.Tensor  # [G, Q] bool
    q_positions: torch.Tensor  # [G, Q] int64: position of each query row in its sequence
    k_positions: torch.Tensor  # [K] int64
    blocks: torch.Tensor  # [G, M] int64: block ids to gather (padding → block 0, masked out)
    out_index: torch.Tensor  # [n] int64: index in T of each valid query row, in q_valid order
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # window → [G, 1, Q, K]
    folded: dict[tuple[int | None, int], torch.Tensor] = field(default_factory=dict)
    """(window, query heads per KV head) → the mask tiled for folded heads: [G, 1, group·Q, K]."""

    def mask(self, sliding_window: int | None, group: int) -> torch.Tensor:
        folded = self.folded.get((sliding_window, group))
        if folded is not None:
            return folded
        if sliding_window is not None and sliding_window not in self.masks:
            # Same rule as transformers' sliding_window_overlay: a query sees the last `window` keys.
            in_window = self.k_positions[None, None, :] > self.q_positions[:, :, None] - sliding_window
            self.masks[sliding_window] = self.masks[None] & in_window[:, None]
        base = self.masks[sliding_window]
        # Decode rows (Q = 1) broadcast over the folded heads; longer queries need the tile.
        folded = base if base.shape[2] == 1 else base.repeat(1, 1, group, 1)
        self.folded[(sliding_window, group)] = folded
        return folded


def _group(meta: AttentionMetadata, members: list[int]) -> _Group:
    device = meta.slot_mapping.device
    block_size = meta.kv_cache.spec.block_size
    rows = torch.tensor(members, dtype=torch.long, device=device)  # [G]
    query_lens = torch.tensor([meta.query_lens[i] for i in members], dtype=torch.long, device=device)
    context_lens = meta.seq_lens.to(torch.long)[rows]  # [G]
    num_blocks = -(-max(meta.context_lens[i] for i in members) // block_size)  # M
    q_offsets = torch.arange(max(meta.query_lens[i] for i in members), device=device)  # [Q]
    k_positions = torch.arange(num_blocks * block_size, device=device)  # [K]

    q_valid = q_offsets[None, :] < query_lens[:, None]  # [G, Q]
    starts = meta.cu_seqlens_q.to(torch.long)[rows]  # [G]
    q_index = (starts[:, None] + q_offsets[None, :]).where(q_valid, 0)  # [G, Q]
    # Padded query rows get positions past the context, so they see every key and never produce NaN.
    q_positions = (context_lens - query_lens)[:, None] + q_offsets[None, :]  # [G, Q]

    blocks = meta.block_tables.to(torch.long)[rows][:, :num_blocks].contiguous()  # [G, M]
    k_valid = k_positions[None, :] < context_lens[:, None]  # [G, K]
    causal = (k_positions[None, None, :] <= q_positions[:, :, None]) & k_valid[:, None, :]  # [G, Q, K]
    return _Group(
        q_index=q_index,
        q_valid=q_valid,
        q_positions=q_positions,
        k_positions=k_positions,
        blocks=blocks,
        out_index=q_index[q_valid],
        masks={None: causal[:, None]},
    )


def prepare(meta: AttentionMetadata) -> list[_Group]:
    """Split the step into a decode group and a prefill group and derive their indices and masks."""
    decodes = [i for i, n in enumerate(meta.query_lens) if n == 1]
    prefills = [i for i, n in enumerate(meta.query_lens) if n > 1]
    groups = [_group(meta, members) for members in (decodes, prefills) if members]
    meta.backend_state["torch_groups"] = groups
    return groups


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [1, H, T, D], rotated
    key: torch.Tensor,  # [1, Hkv, T, D], rotated
    value: torch.Tensor,  # [1, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    openlora_step: AttentionMetadata | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """An `AttentionInterface` function; returns `[1, T, H, D]` as transformers expects."""
    meta = openlora_step
    if meta is None:
        raise RuntimeError("paged attention needs the step metadata (forward kwarg `openlora_step`)")
    groups: list[_Group] = meta.backend_state.get("torch_groups") or prepare(meta)
    layer: int = module.layer_idx  # type: ignore[assignment]
    k_cache = meta.kv_cache.key[layer]  # [slots, Hkv, D]
    v_cache = meta.kv_cache.value[layer]
    k_cache.index_copy_(0, meta.slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
    v_cache.index_copy_(0, meta.slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))

    q_all = query[0].transpose(0, 1)  # [T, H, D]
    num_heads, head_dim = q_all.shape[1:]
    num_kv_heads = k_cache.shape[1]
    group_size = num_heads // num_kv_heads
    block_size = meta.kv_cache.spec.block_size
    # Whole blocks as rows: [num_blocks, block_size, Hkv, D] (a view; slots are block-major).
    k_blocks = k_cache.view(-1, block_size, num_kv_heads, head_dim)
    v_blocks = v_cache.view(-1, block_size, num_kv_heads, head_dim)
    out = torch.empty_like(q_all)
    for group in groups:
        g, num_q = group.q_index.shape
        num_k = group.k_positions.shape[0]
        # index_select on flat indices: ~8x faster than advanced indexing for this gather on CPU.
        q = q_all.index_select(0, group.q_index.view(-1)).view(g, num_q, num_heads, head_dim)
        # Fold the query heads of each KV head into the query axis: [G, Hkv, group·Q, D]. Head h uses
        # KV head h // group_size (transformers' repeat_kv order), so the fold is a reshape.
        q = q.permute(0, 2, 1, 3).reshape(g, num_kv_heads, group_size * num_q, head_dim)
        k = k_blocks.index_select(0, group.blocks.view(-1)).view(g, num_k, num_kv_heads, head_dim)
        v = v_blocks.index_select(0, group.blocks.view(-1)).view(g, num_k, num_kv_heads, head_dim)
        k = k.transpose(1, 2).to(q.dtype)  # [G, Hkv, K, D]
        v = v.transpose(1, 2).to(q.dtype)  # [G, Hkv, K, D]
        result = F.scaled_dot_product_attention(
            q, k, v, attn_mask=group.mask(sliding_window, group_size), scale=scaling
        )  # [G, Hkv, group·Q, D]
        result = result.reshape(g, num_heads, num_q, head_dim).transpose(1, 2)  # [G, Q, H, D]
        out[group.out_index] = result[group.q_valid]
    return out[None], None
