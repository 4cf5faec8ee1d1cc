"""The engine on the real SmolLM2-135M: greedy parity with `generate`, and an 8k-token prompt in chunks."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.inference.engine.kv_cache import KVCacheSpec
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams, Sequence
from tests.integration.inference.hf_reference import hf_greedy
from tests.kit.cpu import fast_dtype

pytestmark = pytest.mark.slow

PROMPTS = [
    "Write one sentence about the sea.",
    "List three prime numbers greater than ten, separated by commas, and explain how you checked them.",
    "What is the capital of France?",
    "Translate to French: the cat sleeps on the warm window sill while the rain falls outside.",
    "Explain in simple words why the sky looks blue during the day but red and orange at sunset, "
    "and what the atmosphere has to do with it.",
]


def current_rss() -> int:
    """Resident bytes of this process now (Linux), without a psutil dependency."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def chat(tokenizer: Any, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(rendered, add_special_tokens=False).input_ids)


def test_staggered_concurrent_prompts_match_generate_fp32(smollm2_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [chat(tokenizer, p) for p in PROMPTS]
    new_tokens = [14, 20, 8, 16, 20]
    # Small chunks and blocks so prompts are prefilled over several steps next to others' decodes.
    engine = LLMEngine.from_pretrained(
        smollm2_dir,
        EngineConfig(block_size=8, max_num_batched_tokens=64, max_prefill_chunk=24, kv_cache_bytes=64 << 20),
    )
    arrivals = {0: [0, 1], 2: [2], 5: [3], 9: [4]}  # step → prompts that arrive then
    seqs: dict[int, Sequence] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished():
        for i in arrivals.get(step, []):
            sampling = SamplingParams(max_new_tokens=new_tokens[i])
            seqs[i] = engine.add_request(f"p{i}", prompts[i], sampling)
        engine.step()
        step += 1
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    reference = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    for i, prompt in enumerate(prompts):
        assert seqs[i].output_token_ids == hf_greedy(reference, prompt, new_tokens[i]), PROMPTS[i]


LONG_TOKENS = 8000
CHUNK = 512


def test_8k_prompt_is_prefilled_in_chunks_while_short_requests_decode(
    smollm2_dir: Path, record_property: Any
) -> None:
    """In the dtype this CPU computes fastest (bf16 only with bf16 instructions), so the 8k prefill
    (~2 TFLOP of attention and matmuls) stays far inside the slow-test budget on a busy machine."""
    dtype = fast_dtype()
    record_property("dtype", dtype)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    # A repeated passage: after 8k tokens the model must still copy it, which it can only do by
    # attending across the chunks it prefilled earlier.
    passage = tokenizer(
        " The lighthouse keeper wrote the weather in his logbook every morning, then climbed the "
        "ninety steps to polish the great lamp before the fishing boats returned to the harbour."
    ).input_ids
    long_prompt = (passage * (LONG_TOKENS // len(passage) + 1))[:LONG_TOKENS]
    expected_next = (passage * (LONG_TOKENS // len(passage) + 2))[LONG_TOKENS : LONG_TOKENS + 6]

    config = AutoModelForCausalLM.from_pretrained(smollm2_dir).config
    block_size = 16
    spec = KVCacheSpec.from_model_config(config, block_size, getattr(torch, dtype))
    # The long request plus three short ones, and no more: the budget is tight by design.
    budget = spec.bytes_per_block * (-(-(LONG_TOKENS + 6) // block_size) + 3 * 6)
    engine = LLMEngine.from_pretrained(
        smollm2_dir,
        EngineConfig(
            block_size=block_size,
            kv_cache_bytes=budget,
            max_num_batched_tokens=CHUNK + 8,
            max_prefill_chunk=CHUNK,
            dtype=dtype,
        ),
    )
    assert engine.kv_cache.num_bytes <= budget
    rss_start = current_rss()

    shorts = {f"short-{i}": chat(tokenizer, text) for i, text in enumerate(PROMPTS[:3])}
    short_budget = 6 * block_size - max(len(p) for p in shorts.values())
    for rid, prompt in shorts.items():
        engine.add_request(rid, prompt, SamplingParams(max_new_tokens=short_budget, ignore_eos=True))
    engine.step()  # the short prompts are in and have their first token
    long_seq = engine.add_request("long", long_prompt, SamplingParams(max_new_tokens=6, ignore_eos=True))

    peak_rss = rss_start
    prefill_steps = 0
    while long_seq.num_output_tokens == 0:
        outputs = engine.step()
        prefill_steps += 1
        assert {o.request_id for o in outputs} >= set(shorts), "a short request missed a step"
        assert long_seq.num_computed_tokens <= prefill_steps * CHUNK
        used = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
        assert used <= engine.block_manager.num_blocks
        peak_rss = max(peak_rss, current_rss())
    while engine.has_unfinished():
        engine.step()
    assert prefill_steps == -(-LONG_TOKENS // CHUNK)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert long_seq.output_token_ids == expected_next, tokenizer.decode(long_seq.output_token_ids)

    kv_mib = engine.kv_cache.num_bytes / 2**20
    growth_mib = (peak_rss - rss_start) / 2**20
    max_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = (
        f"8k prefill: {prefill_steps} chunks, KV cache {kv_mib:.0f} MiB (budget {budget / 2**20:.0f} MiB), "
        f"RSS growth during the run {growth_mib:.0f} MiB, process peak RSS {max_rss_mib:.0f} MiB"
    )
    print(report)
    record_property("peak_rss_mib", round(max_rss_mib))
    # The KV cache is allocated before the run; what grows is activations of one 512-token chunk
    # (scores of 9 heads x 512 x 8k keys per layer, freed layer by layer).
    assert growth_mib < 1024, report
