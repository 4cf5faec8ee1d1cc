"""The reference every engine test compares against: `transformers` `generate`, one prompt at a time."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Greedy continuation of `prompt` alone, including the EOS token if `generate` stopped on one."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return [int(t) for t in out[0, len(prompt) :]]


def peft_with_adapters(base_dir: Path, folders: Mapping[str, Path]) -> Any:
    """One float32 `PeftModel` holding every adapter of `folders` under its name, in eval mode."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(folders)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, str(folders[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(str(folders[name]), adapter_name=name)
    return peft.eval()


def peft_greedy(peft: Any, jobs: list[tuple[list[int], str | None]], max_new_tokens: int) -> list[list[int]]:
    """PEFT's greedy tokens for each (prompt, adapter name or None for the base) alone, EOS ignored."""
    outputs = []
    for prompt, adapter_name in jobs:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = peft.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                adapter_names=[adapter_name or "__base__"],
            )
        outputs.append([int(t) for t in out[0, len(prompt) :]])
    return outputs
