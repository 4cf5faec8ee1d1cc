"""Paged attention backends, each registered with transformers' `AttentionInterface` under a name.

A model runs with our attention once `model.set_attn_implementation(backend_name)` is called; every
backend reads the step's `AttentionMetadata` from the `openlora_step` forward keyword.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import AttentionInterface

from services.inference.engine.attention import flash_attn, torch_sdpa

BACKENDS: dict[str, tuple[str, Callable[..., Any]]] = {
    "torch": (torch_sdpa.NAME, torch_sdpa.paged_attention),
    "flash_attn": (flash_attn.NAME, flash_attn.paged_attention),
}


def register(backend: str) -> str:
    """Register the backend's attention function with transformers; return its implementation name."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "flash_attn" and not flash_attn.available():
        raise ValueError("the flash_attn attention backend needs the flash-attn package and a CUDA device")
    name, fn = BACKENDS[backend]
    AttentionInterface.register(name, fn)
    return name
