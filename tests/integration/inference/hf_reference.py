"""The reference every engine test compares against: `transformers` `generate`, one prompt at a time."""

from __future__ import annotations

from typing import Any

import torch


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` alone, including the EOS token if `generate` stopped on one."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return [int(t) for t in out[0, len(prompt) :]]
