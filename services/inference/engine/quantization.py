"""Weight-only quantisation of the base model's linear layers (adapters and activations keep the dtype).

`int8` stores each decoder-layer `nn.Linear` weight as int8 with one scale per output channel
(torchao `Int8WeightOnlyConfig`); matmuls dequantise on the fly, so linear weights take a quarter of
their fp32 memory. Speed and accuracy are measured, not assumed: `bench/engine_bench.py
--quantization int8` and `tests/integration/inference/test_quantization.py`.
The LM head stays in the model dtype: it is tied to the embeddings in small models (quantising it
would untie and duplicate it) and its rounding error lands directly on the logits.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch

log = logging.getLogger(__name__)

Quantization = Literal["none", "int8"]
QUANTIZATIONS: tuple[Quantization, ...] = ("none", "int8")


def _is_base_linear(module: torch.nn.Module, fqn: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


def quantize_base_weights(model: torch.nn.Module, method: Quantization) -> int:
    """Quantise the model's linear layers in place; return how many were quantised."""
    if method == "none":
        return 0
    if method != "int8":
        raise ValueError(f"unknown quantization {method!r}; choose one of {', '.join(QUANTIZATIONS)}")
    # Imported here: torchao takes seconds to import and only this option needs it.
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    count = sum(1 for fqn, m in model.named_modules() if _is_base_linear(m, fqn))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=_is_base_linear)
    log.info("quantised %d linear layers to int8 (weight-only)", count)
    return count
