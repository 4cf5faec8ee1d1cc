"""The `torch` backend's fast paths (decode rows read and written as views, a decode-only step returned
without a copy, additive masks cached per dtype) against the plain per-sequence reference."""

from __future__ import annotations

import math

import pytest
import torch

from services.inference.engine.attention import torch_sdpa
from services.inference.engine.attention.context import AttentionMetadata
from services.inference.engine.kv_cache import KVCacheSpec, PagedKVCache
from tests.unit.inference.test_attention import BS, HKV, D, H, Layer, reference_attention

# (tokens already cached, new tokens, block table) per sequence, in step order.
DECODES_ONLY = [(9, 1, [7, 2, 11]), (4, 1, [3, 5]), (0, 1, [6])]
DECODES_AFTER_PREFILL = [(0, 6, [3, 5]), (9, 1, [7, 2, 11]), (4, 1, [6, 8])]
DECODES_AROUND_CHUNK = [(9, 1, [7, 2, 11]), (5, 7, [0, 9, 14]), (4, 1, [6, 8]), (2, 1, [12])]


def _interleaved_lengths() -> list[tuple[int, int, list[int]]]:
    """Nine decodes, short and long contexts alternating: split in two groups whose rows are not runs."""
    seqs, next_block = [], 16
    for cached in (2, 30, 3, 29, 1, 31, 4, 2, 3):
        num_blocks = -(-(cached + 1) // BS)
        seqs.append((cached, 1, list(range(next_block, next_block + num_blocks))))
        next_block += num_blocks
    return seqs


DECODES_SPLIT_BY_LENGTH = _interleaved_lengths()


def run_step(
    seqs: list[tuple[int, int, list[int]]], window: int | None, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor], AttentionMetadata]:
    """Fill the cache with each sequence's earlier tokens and run one step: `[1, T, H, D]` output, the
    reference rows of each sequence, and the step's metadata."""
    torch.manual_seed(0)
    spec = KVCacheSpec(num_layers=1, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=dtype)
    cache = PagedKVCache(spec, num_blocks=64)
    olds = []
    for cached, _, table in seqs:
        k_old, v_old = torch.randn(cached, HKV, D).to(dtype), torch.randn(cached, HKV, D).to(dtype)
        slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(cached)], dtype=torch.long)
        cache.key[0, slots] = k_old
        cache.value[0, slots] = v_old
        olds.append((k_old, v_old))
    total = sum(n for _, n, _ in seqs)
    q, k, v = (torch.randn(1, h, total, D).to(dtype) for h in (H, HKV, HKV))
    cu = [0]
    for _, n, _ in seqs:
        cu.append(cu[-1] + n)
    width = max(len(t) for _, _, t in seqs)
    meta = AttentionMetadata(
        kv_cache=cache,
        slot_mapping=torch.tensor([t[p // BS] * BS + p % BS for c, n, t in seqs for p in range(c, c + n)]),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens=torch.tensor([c + n for c, n, _ in seqs], dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for _, _, t in seqs], dtype=torch.int32),
        query_lens=[n for _, n, _ in seqs],
        context_lens=[c + n for c, n, _ in seqs],
    )
    scale = 1 / math.sqrt(D)
    # Twice, as two layers of one step do: the second call reuses the step's indices and masks.
    torch_sdpa.paged_attention(
        Layer(0), q, k, v, None, scaling=scale, sliding_window=window, openlora_step=meta
    )
    out, _ = torch_sdpa.paged_attention(
        Layer(0), q, k, v, None, scaling=scale, sliding_window=window, openlora_step=meta
    )
    assert out.shape == (1, total, H, D) and out.dtype == dtype
    expected = []
    for i, (cached, _, _) in enumerate(seqs):
        rows = slice(cu[i], cu[i + 1])
        k_all = torch.cat([olds[i][0], k[0, :, rows].transpose(0, 1)]).float()
        v_all = torch.cat([olds[i][1], v[0, :, rows].transpose(0, 1)]).float()
        q_seq = q[0, :, rows].transpose(0, 1).float()
        expected.append(reference_attention(q_seq, k_all, v_all, cached, scale, window))
    return out, expected, meta


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize(
    "seqs",
    [DECODES_ONLY, DECODES_AFTER_PREFILL, DECODES_AROUND_CHUNK, DECODES_SPLIT_BY_LENGTH],
    ids=["only", "after", "around", "split"],
)
def test_decode_layouts_match_reference(seqs: list[tuple[int, int, list[int]]], window: int | None) -> None:
    out, expected, _ = run_step(seqs, window, torch.float32)
    torch.testing.assert_close(out[0], torch.cat(expected), rtol=1e-5, atol=1e-5)


def test_decodes_of_very_different_lengths_read_fewer_blocks() -> None:
    _, _, meta = run_step(DECODES_SPLIT_BY_LENGTH, None, torch.float32)
    groups = meta.backend_state["torch_groups"]
    assert [g.num_seqs for g in groups] == [6, 3]
    assert sum(g.blocks.numel() for g in groups) < 9 * 8, "one group would read 8 blocks per sequence"


def test_bfloat16_step_uses_a_mask_in_its_own_dtype() -> None:
    out, expected, _ = run_step(DECODES_AROUND_CHUNK, None, torch.bfloat16)
    torch.testing.assert_close(out[0].float(), torch.cat(expected), rtol=2e-2, atol=2e-2)
