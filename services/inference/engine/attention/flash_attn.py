"""The `flash_attn` attention backend (CUDA, fp16/bf16): FlashAttention-2's varlen kernel over the step.

Semantics are the `torch` backend's (see `torch_sdpa`): new keys and values are written to their cache
slots first, then every sequence's query tokens attend to its whole context, causally aligned to the
end of the context (a query at position p sees keys 0..p) and, with a sliding window w, to the last w
keys only (flash-attn's `window_size=(w - 1, 0)`, transformers' rule).

The context is gathered from the paged cache into one packed [Σ context, Hkv, D] tensor per layer, with
token-level slot indices built once per step: upstream flash-attn reads paged K/V in place only for
page sizes that are multiples of 256, far above the engine's block size. GQA is native to the kernel.
"""

from __future__ import annotations

from typing import Any

import torch

from services.inference.engine.attention.context import AttentionMetadata

NAME = "openlora_flash_attn"


def available() -> bool:
    """True when flash-attn imports and a CUDA device is present."""
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def _context_slots(meta: AttentionMetadata) -> dict[str, Any]:
    """Cache slot of every context token, sequence after sequence, and the cumulative context lengths."""
    device = meta.slot_mapping.device
    block_size = meta.kv_cache.spec.block_size
    context_lens = meta.seq_lens.to(torch.long)  # [B]
    positions = torch.arange(meta.max_context_len, device=device)  # [M·block]
    valid = positions[None, :] < context_lens[:, None]  # [B, P]
    table_index = (positions // block_size)[None, :].expand(meta.num_seqs, -1)  # [B, P]
    blocks = meta.block_tables.to(torch.long).gather(1, table_index)  # padding rows read block 0, masked
    slots = blocks * block_size + positions % block_size  # [B, P]
    cu_seqlens_k = torch.zeros(meta.num_seqs + 1, dtype=torch.int32, device=device)
    cu_seqlens_k[1:] = torch.cumsum(context_lens, 0)
    state = {"k_index": slots[valid], "cu_seqlens_k": cu_seqlens_k}
    meta.backend_state["flash_attn"] = state
    return state


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
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise RuntimeError(f"the flash_attn backend runs in float16 or bfloat16, not {query.dtype}")
    from flash_attn import flash_attn_varlen_func

    state = meta.backend_state.get("flash_attn") or _context_slots(meta)
    layer: int = module.layer_idx  # type: ignore[assignment]
    k_cache, v_cache = meta.kv_cache.write(layer, meta.slot_mapping, key, value)  # [slots, Hkv, D]
    q = query[0].transpose(0, 1).contiguous()  # [T, H, D]
    k = k_cache.index_select(0, state["k_index"]).to(q.dtype)  # [Σ context, Hkv, D]
    v = v_cache.index_select(0, state["k_index"]).to(q.dtype)
    out = flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=meta.cu_seqlens_q,
        cu_seqlens_k=state["cu_seqlens_k"],
        max_seqlen_q=meta.max_query_len,
        max_seqlen_k=meta.max_context_len,
        dropout_p=0.0,
        softmax_scale=scaling,
        causal=True,
        window_size=(sliding_window - 1, 0) if sliding_window else (-1, -1),
    )  # [T, H, D]
    return out[None], None
