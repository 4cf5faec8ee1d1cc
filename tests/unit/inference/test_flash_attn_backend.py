"""The `flash_attn` backend's plumbing (cache writes, context gather, cu_seqlens, causal alignment, window)
against the `torch` backend. On CPU the kernel is stood in for by a plain-torch implementation of
`flash_attn_varlen_func`'s documented semantics; with a GPU and flash-attn installed the real kernel runs."""

from __future__ import annotations

import math
import sys
import types

import pytest
import torch

from services.inference.engine.attention import flash_attn as flash_backend
from services.inference.engine.attention import torch_sdpa
from services.inference.engine.attention.context import AttentionMetadata
from services.inference.engine.kv_cache import KVCacheSpec, PagedKVCache

H, HKV, D, BS = 4, 2, 16, 4


class Layer(torch.nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx


def varlen_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
) -> torch.Tensor:
    """flash_attn_varlen_func as documented: causal masks align to the bottom right; a query at row i
    of a sequence with q_len queries and k_len keys sits at key position k_len - q_len + i."""
    assert causal and dropout_p == 0.0 and window_size[1] in (0, -1)
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    for b in range(len(cu_seqlens_q) - 1):
        qs, qe, ks, ke = (
            int(cu_seqlens_q[b]),
            int(cu_seqlens_q[b + 1]),
            int(cu_seqlens_k[b]),
            int(cu_seqlens_k[b + 1]),
        )
        keys = k[ks:ke].float().repeat_interleave(group, dim=1)  # [k_len, H, D]
        values = v[ks:ke].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[qs:qe].float(), keys) * (
            softmax_scale or 1 / math.sqrt(q.shape[2])
        )
        q_pos = torch.arange(qe - qs)[:, None] + (ke - ks) - (qe - qs)
        k_pos = torch.arange(ke - ks)[None, :]
        allowed = k_pos <= q_pos
        if window_size[0] >= 0:
            allowed &= k_pos >= q_pos - window_size[0]
        scores = scores.masked_fill(~allowed[None], float("-inf"))
        out[qs:qe] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values).to(q.dtype)
    return out


def step(
    device: str, dtype: torch.dtype
) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    spec = KVCacheSpec(num_layers=2, num_kv_heads=HKV, head_dim=D, block_size=BS, dtype=dtype)
    cache = PagedKVCache(spec, num_blocks=16, device=torch.device(device))
    seqs = [(9, 1, [7, 2, 11]), (0, 6, [3, 5]), (5, 7, [0, 9, 14]), (3, 1, [4])]  # (cached, new, blocks)
    for cached, _, table in seqs:
        slots = torch.tensor(
            [table[p // BS] * BS + p % BS for p in range(cached)], dtype=torch.long, device=device
        )
        cache.key[1, slots] = torch.randn(cached, HKV, D, device=device).to(dtype)
        cache.value[1, slots] = torch.randn(cached, HKV, D, device=device).to(dtype)
    total = sum(n for _, n, _ in seqs)
    q, k, v = (torch.randn(1, heads, total, D, device=device).to(dtype) for heads in (H, HKV, HKV))
    cu = [0]
    for _, n, _ in seqs:
        cu.append(cu[-1] + n)
    width = max(len(t) for _, _, t in seqs)
    meta = AttentionMetadata(
        kv_cache=cache,
        slot_mapping=torch.tensor(
            [t[p // BS] * BS + p % BS for c, n, t in seqs for p in range(c, c + n)], device=device
        ),
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
        seq_lens=torch.tensor([c + n for c, n, _ in seqs], dtype=torch.int32, device=device),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for _, _, t in seqs], dtype=torch.int32, device=device
        ),
        query_lens=[n for _, n, _ in seqs],
        context_lens=[c + n for c, n, _ in seqs],
    )
    return meta, q, k, v


def compare(device: str, window: int | None) -> None:
    meta, q, k, v = step(device, torch.bfloat16)
    scale = 1 / math.sqrt(D)
    flash_out, _ = flash_backend.paged_attention(
        Layer(1), q, k, v, None, scaling=scale, sliding_window=window, openlora_step=meta
    )
    cache_after = meta.kv_cache.key.clone()
    meta.backend_state.clear()
    torch_out, _ = torch_sdpa.paged_attention(
        Layer(1), q, k, v, None, scaling=scale, sliding_window=window, openlora_step=meta
    )
    assert torch.equal(meta.kv_cache.key, cache_after)  # both wrote the same keys to the same slots
    assert flash_out.shape == torch_out.shape == (1, q.shape[2], H, D)
    torch.testing.assert_close(flash_out.float(), torch_out.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("window", [None, 3])
def test_the_backend_equals_the_torch_backend_with_the_kernel_stood_in(
    window: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    stand_in = types.ModuleType("flash_attn")
    stand_in.flash_attn_varlen_func = varlen_reference  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in)
    compare("cpu", window)


def test_float32_is_refused_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    meta, q, k, v = step("cpu", torch.float32)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        flash_backend.paged_attention(Layer(1), q, k, v, None, openlora_step=meta)


@pytest.mark.cuda
@pytest.mark.parametrize("window", [None, 3])
def test_the_real_kernel_equals_the_torch_backend_on_cuda(window: int | None) -> None:
    pytest.importorskip("flash_attn")
    compare("cuda", window)


def test_the_backend_is_unavailable_without_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert not flash_backend.available()
