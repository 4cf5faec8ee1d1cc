"""Choosing the attention backend and the LoRA op: what runs where, and clear refusals elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.inference.engine.attention import register
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from tests.kit.cpu import cpu_lora_op


def test_flash_attn_needs_a_half_precision_dtype() -> None:
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        EngineConfig(attention_backend="flash_attn", dtype="float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_flash_attn_is_refused_without_a_gpu() -> None:
    with pytest.raises(ValueError, match="flash-attn package and a CUDA device"):
        register("flash_attn")
    with pytest.raises(ValueError, match="unknown attention backend"):
        register("magic")


def test_the_lora_op_is_chosen_by_name_and_auto_picks_the_compiled_one_on_cpu(tiny_llama_dir: Path) -> None:
    def config(op: str) -> EngineConfig:
        return EngineConfig(lora_slots=2, lora_max_rank=8, kv_cache_bytes=1 << 20, lora_op=op)

    for name, picked in (("auto", cpu_lora_op()), ("segment", "segment")):
        engine = LLMEngine.from_pretrained(tiny_llama_dir, config(name))
        assert engine.residency is not None and engine.residency.pool.op_name == picked
    with pytest.raises(ValueError, match="unknown LoRA op"):
        LLMEngine.from_pretrained(tiny_llama_dir, config("magic"))
    if not torch.cuda.is_available():
        pytest.importorskip("triton")
        with pytest.raises(ValueError, match="runs on CUDA"):
            LLMEngine.from_pretrained(tiny_llama_dir, config("triton"))
