"""Parity on a model of SmolLM2-135M's shape (random weights: nothing is downloaded).

30 layers, 9 query heads over 3 KV heads, head_dim 64 and a 49k vocabulary: deeper and wider than the
tiny test models, so small numeric differences in our attention would have room to flip a token.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams
from tests.integration.inference.hf_reference import hf_greedy


@pytest.mark.slow
def test_smollm2_shaped_model_matches_generate() -> None:
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        # Wider than the default 0.02 so greedy decoding is not decided by near-ties.
        initializer_range=0.05,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    reference.load_state_dict(model.state_dict())
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 49000) for _ in range(rng.randint(5, 40))] for _ in range(3)]
    expected = [hf_greedy(reference, p, 6) for p in prompts]
    engine = LLMEngine(
        model,
        EngineConfig(block_size=16, kv_cache_bytes=1 << 26, max_num_batched_tokens=64, max_prefill_chunk=20),
    )
    assert engine.generate(prompts, SamplingParams(max_new_tokens=6)) == expected
