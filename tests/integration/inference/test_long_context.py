"""A long prompt is prefilled in chunks while short requests keep decoding, within the KV budget."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from services.inference.engine.kv_cache import KVCacheSpec
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams
from tests.integration.inference.hf_reference import hf_greedy

LONG = 3000  # the tiny models allow 4096 positions
CHUNK = 256


def test_long_prompt_is_chunked_while_short_requests_decode_every_step(tiny_llama_dir: Path) -> None:
    config = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).config
    block_size = 16
    spec = KVCacheSpec.from_model_config(config, block_size, torch.float32)
    budget = spec.bytes_per_block * (LONG // block_size + 40)
    engine = LLMEngine.from_pretrained(
        tiny_llama_dir,
        EngineConfig(
            block_size=block_size,
            kv_cache_bytes=budget,
            max_num_batched_tokens=CHUNK + 8,
            max_prefill_chunk=CHUNK,
        ),
    )
    assert engine.kv_cache.num_bytes <= budget
    rng = random.Random(5)
    long_prompt = [rng.randrange(3, 500) for _ in range(LONG)]
    shorts = {f"short-{i}": [rng.randrange(3, 500) for _ in range(5 + i)] for i in range(3)}
    for rid, prompt in shorts.items():
        engine.add_request(rid, prompt, SamplingParams(max_new_tokens=40, ignore_eos=True))
    engine.step()  # the short prompts are in and have their first token
    long_seq = engine.add_request("long", long_prompt, SamplingParams(max_new_tokens=4))

    prefill_steps = 0
    while long_seq.num_output_tokens == 0:
        outputs = engine.step()
        prefill_steps += 1
        assert {o.request_id for o in outputs} >= set(shorts), "a short request missed a step"
        assert long_seq.num_computed_tokens <= prefill_steps * CHUNK
    assert prefill_steps == -(-LONG // CHUNK)
    while engine.has_unfinished():
        engine.step()

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert long_seq.output_token_ids == hf_greedy(hf, long_prompt, 4)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
