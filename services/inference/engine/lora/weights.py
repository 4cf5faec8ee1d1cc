"""PEFT adapter tensors -> the per-module (A, B) pairs the slot pool loads."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# base_model.model.<module path>.lora_<A|B>[.<adapter name>].weight
_NAME = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>.+)\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


def peft_pairs(tensors: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Group PEFT-named tensors by module path, e.g. 'model.layers.0.self_attn.q_proj' -> (A, B)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _NAME.match(name)
        if match is None:
            raise ValueError(f"{name!r} is not a PEFT LoRA weight name")
        parts.setdefault(match["path"], {})[match["part"]] = tensor
    pairs = {}
    for path, found in parts.items():
        if set(found) != {"A", "B"}:
            raise ValueError(f"{path} lacks its lora_{'B' if 'A' in found else 'A'} weight")
        pairs[path] = (found["A"], found["B"])
    return pairs
