"""The paged KV cache: one K and one V tensor for all layers, allocated once, addressed by slot.

Slot `block * block_size + offset` holds one token's key (or value) for every KV head. Layers index
their own slice; the attention backend writes new tokens with `index_copy_` and reads a sequence's
context through its block table. Nothing here is allocated per step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def from_model_config(cls, config: Any, block_size: int, dtype: torch.dtype) -> KVCacheSpec:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
        return cls(
            num_layers=int(config.num_hidden_layers),
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(head_dim),
            block_size=block_size,
            dtype=dtype,
        )

    @property
    def bytes_per_block(self) -> int:
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * itemsize

    def num_blocks_for(self, budget_bytes: int) -> int:
        return budget_bytes // self.bytes_per_block


def free_device_memory(device: torch.device) -> int:
    """Bytes the KV cache could take on `device` before anything else is allocated there."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    # Host memory: what the kernel reports as available now (Linux).
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PagedKVCache:
    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device | str = "cpu") -> None:
        if num_blocks < 1:
            raise ValueError(
                f"the KV cache budget holds no block of {spec.bytes_per_block} bytes; raise kv_cache_bytes"
            )
        self.spec = spec
        self.num_blocks = num_blocks
        num_slots = num_blocks * spec.block_size
        shape = (spec.num_layers, num_slots, spec.num_kv_heads, spec.head_dim)
        # Zero-filled so a padded gather never reads uninitialised memory (NaN * 0 is NaN).
        self.key = torch.zeros(shape, dtype=spec.dtype, device=device)  # [L, slots, Hkv, D]
        self.value = torch.zeros(shape, dtype=spec.dtype, device=device)  # [L, slots, Hkv, D]

    @property
    def num_bytes(self) -> int:
        return 2 * self.key.numel() * self.key.element_size()

    def write(
        self, layer: int, slot_mapping: torch.Tensor, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a step's new keys and values (`[1, Hkv, T, D]`, as attention receives them) in their
        slots; return the layer's whole K and V caches (`[slots, Hkv, D]`)."""
        k_cache, v_cache = self.key[layer], self.value[layer]
        k_cache.index_copy_(0, slot_mapping, key[0].transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(0, slot_mapping, value[0].transpose(0, 1).to(v_cache.dtype))
        return k_cache, v_cache
