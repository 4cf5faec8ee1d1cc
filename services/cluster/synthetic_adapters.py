"""PEFT-format LoRA adapters with random weights for any Llama-shaped model, written without loading it.

The demo's adapters, and the tests' and benchmarks' wherever running PEFT on the base model would be too
slow: the tensor names, shapes and config follow what PEFT's `save_pretrained` writes, so PEFT and the
store read them as its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SMOLLM2_135M_CONFIG: dict[str, int | str] = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "num_hidden_layers": 30,
    "vocab_size": 49152,
}


def module_shapes(config: dict[str, int | str]) -> dict[str, tuple[int, int]]:
    hidden, inter = int(config["hidden_size"]), int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    head_dim = hidden // heads
    kv = int(config.get("num_key_value_heads", heads)) * head_dim
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def write_adapter(
    out_dir: Path,
    config: dict[str, int | str],
    *,
    rank: int,
    targets: list[str],
    seed: int = 0,
    layers: int | None = None,
    base_model: str = "",
    std: float = 0.02,
) -> Path:
    """Random fp32 LoRA weights ~ N(0, std²) for `targets` in every layer (or the first `layers`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = module_shapes(config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers if layers is not None else int(config["num_hidden_layers"])):
        for module in targets:
            d_in, d_out = shapes[module]
            block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, d_in, generator=generator) * std
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(d_out, rank, generator=generator) * std
    save_file(tensors, out_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "lora_dropout": 0.0,
    }
    (out_dir / "adapter_config.json").write_text(json.dumps(peft_config))
    return out_dir
