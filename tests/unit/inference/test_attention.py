"""The `torch` paged attention backend against a plain per-sequence softmax reference."""

from __future__ import annotations

import math

import pytest
import torch

from services.inference.engine.attention import register, torch_sdpa
from services.inference.engine.attention.context import AttentionMetadata
from services.inference.engine.kv_cache import KVCacheSpec, PagedKVCache

H, HKV, D, BS = 4, 2, 8, 4


class Layer(torch.nn.Module):
    """What the backend reads from transformers' attention module: its layer index."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first_pos: int, scale: float, window: int | None
) -> torch.Tensor:
    """q [n, H, D] at positions first_pos.., k/v [ctx, HKV, D] for positions 0..ctx-1 → [n, H, D]."""
    out = torch.empty_like(q)
    group = H // HKV
    for t in range(q.shape[0]):
        pos = first_pos + t
        for h in range(H):
            keys = k[: pos + 1, h // group]
            values = v[: pos + 1, h // group]
            scores = keys @ q[t, h] * scale
            if window is not None:
                scores[: max(0, pos + 1 - window)] = float("-inf")
            out[t, h] = scores.softmax(dim=0) @ values
    return out


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_reference(window: int | None) -> None:
    torch.manual_seed(0)
    spec = KVCacheSpec(num_layers=2, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=torch.float32)
    cache = PagedKVCache(spec, num_blocks=16)
    # (tokens already cached, new tokens, block table): a decode, a fresh prefill, a later chunk.
    seqs = [(9, 1, [7, 2, 11]), (0, 6, [3, 5]), (5, 7, [0, 9, 14])]
    layer = 1
    olds = []
    for cached, _, table in seqs:
        k_old, v_old = torch.randn(cached, HKV, D), torch.randn(cached, HKV, D)
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(cached)], dtype=torch.long)
        cache.key[layer, slots] = k_old
        cache.value[layer, slots] = v_old
        olds.append((k_old, v_old))
    total = sum(n for _, n, _ in seqs)
    q, k, v = torch.randn(1, H, total, D), torch.randn(1, HKV, total, D), torch.randn(1, HKV, total, D)
    slot_mapping = [t[p // BS] * BS + p % BS for c, n, t in seqs for p in range(c, c + n)]
    cu = [0]
    for _, n, _ in seqs:
        cu.append(cu[-1] + n)
    width = max(len(t) for _, _, t in seqs)
    meta = AttentionMetadata(
        kv_cache=cache,
        slot_mapping=torch.tensor(slot_mapping),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n, _ in seqs], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for _, _, t in seqs], dtype=torch.int32),
        query_lens=[n for _, n, _ in seqs],
        context_lens=[c + n for c, n, _ in seqs],
    )
    scale = 1 / math.sqrt(D)
    out, weights = torch_sdpa.paged_attention(
        Layer(layer), q, k, v, None, scaling=scale, sliding_window=window, openlora_step=meta
    )
    assert weights is None and out.shape == (1, total, H, D)
    assert torch.equal(cache.key[layer, torch.tensor(slot_mapping)], k[0].transpose(0, 1))
    assert cache.key[0].abs().sum() == 0, "other layers are untouched"
    for i, (cached, _, _) in enumerate(seqs):
        rows = slice(cu[i], cu[i + 1])
        k_all = torch.cat([olds[i][0], k[0, :, rows].transpose(0, 1)])
        v_all = torch.cat([olds[i][1], v[0, :, rows].transpose(0, 1)])
        expected = reference_attention(q[0, :, rows].transpose(0, 1), k_all, v_all, cached, scale, window)
        torch.testing.assert_close(out[0, rows], expected, rtol=1e-5, atol=1e-5)


def test_missing_step_metadata_is_a_clear_error() -> None:
    q = torch.randn(1, H, 2, D)
    with pytest.raises(RuntimeError, match="openlora_step"):
        torch_sdpa.paged_attention(Layer(0), q, q[:, :HKV], q[:, :HKV], None)


def test_backends_register_by_name() -> None:
    assert register("torch") == torch_sdpa.NAME
    with pytest.raises(ValueError, match="unknown attention backend"):
        register("nope")


def test_kv_cache_is_sized_from_a_byte_budget() -> None:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=torch.bfloat16)
    assert spec.bytes_per_block == 2 * 2 * BS * HKV * D * 2
    blocks = spec.num_blocks_for(10 * spec.bytes_per_block + 1)
    assert blocks == 10
    cache = PagedKVCache(spec, blocks)
    assert cache.num_bytes == 10 * spec.bytes_per_block
    assert cache.key.shape == (2, 10 * BS, HKV, D) and cache.key.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="kv_cache_bytes"):
        PagedKVCache(spec, spec.num_blocks_for(spec.bytes_per_block - 1))
