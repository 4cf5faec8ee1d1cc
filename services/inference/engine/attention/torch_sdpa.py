"""The `torch` attention backend: SDPA over K/V gathered from the paged cache (CPU and any GPU).

Semantics, for each layer and each sequence b of the step:

    cache[slot_mapping[t]] = k[t], v[t]                 for every new token t
    keys_b = cache[slot(b, j)] for j < seq_lens[b]       (slot from the block table)
    out[t] = softmax(q[t] · keys_bᵀ · scale + mask) · values_b, mask causal (and windowed)

Decoding sequences (one new token) run as one padded SDPA call (two when their context lengths differ
enough) and each prefilling sequence as its own, so a long prompt chunk never pads decode rows, nor
another chunk, to its length: no group pads its query rows. Gather indices and masks are built once
per step and shared by every layer.

Layout choices that make the CPU path fast (measured on SmolLM2's shape, 32 decodes of ~400 tokens):
K/V are gathered a whole block at a time (one `index_select` row = `block_size` tokens, ~4x faster
than per-token rows; keys past a sequence's end are masked), and the query heads that share a KV head
are folded into the query-length axis ([G, Hkv, group·Q, D]) so SDPA runs without `enable_gqa`,
which expands K/V per query head (~2x faster in fp32, ~5x in bf16). Masks are additive and already in
the query dtype: SDPA would otherwise convert a boolean mask in every layer. A group whose queries are
one contiguous run of the step (decodes usually are) is read and written through views, not gathers.

On CPU, decode groups skip all of that: a compiled op (`cpu_attention.cpp`, built with the engine's
other CPU ops) reads each sequence's K/V rows in place up to its own length, with no gather and no
padding. Inside a SmolLM2 decode step of 64 sequences (2 threads), a call for half of them went from
~500 to 246 µs in float32 and ~320 to 187 in bfloat16 (`bench/RESULTS.md`, 2026-12-05). Prefill
groups, other devices, and machines where the op cannot be built keep SDPA.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from services.inference.engine.attention.context import AttentionMetadata
from services.inference.engine.cpu_kernels import KernelUnavailable, library

log = logging.getLogger(__name__)

NAME = "openlora_torch"


@dataclass
class _Group:
    """G = sequences in the group, Q = their longest query, M = most blocks one of them reads, K = M·block."""

    num_seqs: int  # G
    num_q: int  # Q
    q_start: int | None
    """When the group's query rows are the step's tokens `q_start .. q_start + G·Q` in order, unpadded."""
    q_index: torch.Tensor  # [G·Q] int64: index in T of each query row
    q_positions: torch.Tensor  # [G, Q] int64: position of each query row in its sequence
    k_positions: torch.Tensor  # [K] int64
    blocks: torch.Tensor  # [G·M] int64: block ids to gather (padding → block 0, masked out)
    allowed: torch.Tensor  # [G, 1, Q, K] bool: causal and within the context
    table: torch.Tensor  # [G, M] int32: each sequence's block ids (the compiled decode op's input)
    lens: torch.Tensor  # [G] int64: each sequence's context length
    masks: dict[tuple[int | None, int, torch.dtype], torch.Tensor] = field(default_factory=dict)
    """(window, query heads per KV head, dtype) → additive mask for folded heads: [G, 1, group·Q, K]."""

    def mask(self, sliding_window: int | None, group: int, dtype: torch.dtype) -> torch.Tensor:
        key = (sliding_window, group, dtype)
        mask = self.masks.get(key)
        if mask is not None:
            return mask
        allowed = self.allowed
        if sliding_window is not None:
            # Same rule as transformers' sliding_window_overlay: a query sees the last `window` keys.
            in_window = self.k_positions[None, None, :] > self.q_positions[:, :, None] - sliding_window
            allowed = allowed & in_window[:, None]
        # Decode rows (Q = 1) broadcast over the folded heads; longer queries need the tile.
        if allowed.shape[2] > 1:
            allowed = allowed.repeat(1, 1, group, 1)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, float("-inf"))
        self.masks[key] = mask
        return mask


def _group(meta: AttentionMetadata, members: list[int]) -> _Group:
    device = meta.slot_mapping.device
    block_size = meta.kv_cache.spec.block_size
    rows = torch.tensor(members, dtype=torch.long, device=device)  # [G]
    query_lens = torch.tensor([meta.query_lens[i] for i in members], dtype=torch.long, device=device)
    context_lens = meta.seq_lens.to(torch.long)[rows]  # [G]
    num_blocks = -(-max(meta.context_lens[i] for i in members) // block_size)  # M
    num_q = max(meta.query_lens[i] for i in members)  # Q
    q_offsets = torch.arange(num_q, device=device)  # [Q]
    k_positions = torch.arange(num_blocks * block_size, device=device)  # [K]

    starts = meta.cu_seqlens_q.to(torch.long)[rows]  # [G]
    q_index = starts[:, None] + q_offsets[None, :]  # [G, Q]
    q_positions = (context_lens - query_lens)[:, None] + q_offsets[None, :]  # [G, Q]

    table = meta.block_tables[rows][:, :num_blocks].to(torch.int32).contiguous()  # [G, M]
    k_valid = k_positions[None, :] < context_lens[:, None]  # [G, K]
    causal = (k_positions[None, None, :] <= q_positions[:, :, None]) & k_valid[:, None, :]  # [G, Q, K]
    # Decodes are scheduled as consecutive chunks, so their rows are normally one run of the step; a
    # lone sequence's rows always are.
    first = members[0]
    contiguous = len(members) == 1 or (num_q == 1 and members == list(range(first, first + len(members))))
    return _Group(
        num_seqs=len(members),
        num_q=num_q,
        q_start=sum(meta.query_lens[:first]) if contiguous else None,
        q_index=q_index.reshape(-1),
        q_positions=q_positions,
        k_positions=k_positions,
        blocks=table.to(torch.long).reshape(-1),
        allowed=causal[:, None],
        table=table,
        lens=context_lens,
    )


def _decode_groups(meta: AttentionMetadata, decodes: list[int]) -> list[list[int]]:
    """The decodes as one group, or as two split by context length when that gathers at least 20% fewer
    blocks: every row of a group reads as many blocks as the group's longest context."""
    if len(decodes) < 8:  # below this the extra calls cost more than the padding saves
        return [decodes] if decodes else []
    by_length = sorted(decodes, key=lambda i: meta.context_lens[i])
    blocks = [-(-meta.context_lens[i] // meta.kv_cache.spec.block_size) for i in by_length]
    whole = len(by_length) * blocks[-1]
    cost, cut = min(
        (j * blocks[j - 1] + (len(by_length) - j) * blocks[-1], j) for j in range(1, len(by_length))
    )
    if cost > 0.8 * whole:
        return [decodes]
    return [sorted(by_length[:cut]), sorted(by_length[cut:])]


def prepare(meta: AttentionMetadata) -> list[_Group]:
    """Split the step into decode groups and one group per prefill; derive their indices and masks."""
    decodes = [i for i, n in enumerate(meta.query_lens) if n == 1]
    prefills = [i for i, n in enumerate(meta.query_lens) if n > 1]
    # One group per prefilling sequence: padding chunks of different lengths to the longest one doubled
    # the attention time of a 512-token step of the engine benchmark, far more than the extra calls cost.
    # Every group is then decodes only (Q = 1) or a single sequence, so no query row is padding.
    groups = [_group(meta, members) for members in [*_decode_groups(meta, decodes), *([i] for i in prefills)]]
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
    k_cache, v_cache = meta.kv_cache.write(layer, meta.slot_mapping, key, value)  # [slots, Hkv, D]

    q_all = query[0].transpose(0, 1)  # [T, H, D]
    if len(groups) == 1 and groups[0].q_start == 0:
        # One contiguous group (a decode-only step, a lone prefill): its rows are the whole output.
        return _attend(groups[0], q_all, k_cache, v_cache, scaling, sliding_window, meta)[None], None
    out = torch.empty_like(q_all)
    for group in groups:
        result = _attend(group, q_all, k_cache, v_cache, scaling, sliding_window, meta)
        if group.q_start is not None:
            out.narrow(0, group.q_start, result.shape[0]).copy_(result)
        else:
            out.index_copy_(0, group.q_index, result)
    return out[None], None


def _attend(
    group: _Group,
    q_all: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [slots, Hkv, D]
    v_cache: torch.Tensor,  # [slots, Hkv, D]
    scaling: float | None,
    sliding_window: int | None,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """The group's attention output, one row per (sequence, query row): [G·Q, H, D]."""
    if group.num_q == 1 and k_cache.device.type == "cpu" and k_cache.dtype == q_all.dtype:
        decode = _compiled_decode()
        if decode is not None:
            return _attend_compiled(decode, group, q_all, k_cache, v_cache, scaling, sliding_window, meta)
    num_heads, head_dim = q_all.shape[1:]
    num_kv_heads = k_cache.shape[1]
    group_size = num_heads // num_kv_heads
    block_size = meta.kv_cache.spec.block_size
    g, num_q = group.num_seqs, group.num_q
    num_k = group.k_positions.shape[0]
    if group.q_start is not None:
        q = q_all.narrow(0, group.q_start, g * num_q)
    else:
        # index_select on flat indices: ~8x faster than advanced indexing for this gather on CPU.
        q = q_all.index_select(0, group.q_index)
    # Fold the query heads of each KV head into the query axis: [G, Hkv, group·Q, D]. Head h uses
    # KV head h // group_size (transformers' repeat_kv order), so the fold is a reshape.
    q = q.view(g, num_q, num_heads, head_dim).permute(0, 2, 1, 3)
    q = q.reshape(g, num_kv_heads, group_size * num_q, head_dim)
    # Whole blocks as rows: [num_blocks, block_size, Hkv, D] (a view; slots are block-major).
    k_blocks = k_cache.view(-1, block_size, num_kv_heads, head_dim)
    v_blocks = v_cache.view(-1, block_size, num_kv_heads, head_dim)
    k = k_blocks.index_select(0, group.blocks).view(g, num_k, num_kv_heads, head_dim)
    v = v_blocks.index_select(0, group.blocks).view(g, num_k, num_kv_heads, head_dim)
    k = k.transpose(1, 2).to(q.dtype)  # [G, Hkv, K, D]
    v = v.transpose(1, 2).to(q.dtype)  # [G, Hkv, K, D]
    mask = group.mask(sliding_window, group_size, q.dtype)
    result = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)  # [G, Hkv, group·Q, D]
    return result.view(g, num_heads, num_q, head_dim).transpose(1, 2).reshape(g * num_q, num_heads, head_dim)


_decode_op: Any = None  # the compiled op, False once it is known not to build here


def _compiled_decode() -> Any:
    """The compiled decode op, or None where it cannot be built (said once; SDPA serves instead)."""
    global _decode_op
    if _decode_op is None:
        try:
            _decode_op = library().paged_decode
        except KernelUnavailable as exc:
            log.warning("%s; decode attention uses SDPA over gathered blocks", exc)
            _decode_op = False
    return _decode_op or None


def _attend_compiled(
    decode: Any,
    group: _Group,
    q_all: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """A decode group's output ([G, H, D]) from the compiled op, which reads the cache in place."""
    g = group.num_seqs
    q = (
        q_all.narrow(0, group.q_start, g)
        if group.q_start is not None
        else q_all.index_select(0, group.q_index)
    )
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    block_size = meta.kv_cache.spec.block_size
    decode(out, q, k_cache, v_cache, group.table, group.lens, block_size, scale, sliding_window or -1)
    return out
