"""The engine on a CUDA device (skipped without one; `scripts/gpu_check.sh` runs these on a GPU machine)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.cluster.tiny_models import FAMILIES, Family
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams

pytestmark = pytest.mark.cuda


def prompts(seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [
        ([rng.randrange(3, 500) for _ in range(rng.randint(1, 70))], rng.randint(1, 20)) for _ in range(8)
    ]


def greedy_on_cuda(model: Any, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt], device="cuda")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, len(prompt) :]]


@pytest.mark.parametrize("family", FAMILIES)
def test_staggered_requests_match_generate_on_cuda(
    tiny_model_factory: Callable[[Family], Path], family: Family
) -> None:
    """fp32 on one device for both, so only batching can make a difference; TF32 off for the same reason."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dir = tiny_model_factory(family)
    engine = LLMEngine.from_pretrained(
        model_dir,
        EngineConfig(
            block_size=4,
            max_num_batched_tokens=48,
            max_prefill_chunk=9,
            kv_cache_bytes=1 << 24,
            device="cuda",
        ),
    )
    assert engine.kv_cache.key.is_cuda
    cases = prompts(seed=21)
    seqs = []
    for i, (prompt, n) in enumerate(cases):
        seqs.append(engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=n)))
        engine.step()  # one request arrives per step
    while engine.has_unfinished():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    reference: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference.to("cuda")
    with torch.inference_mode():
        expected = [greedy_on_cuda(reference, p, n) for p, n in cases]
    assert [s.output_token_ids for s in seqs] == expected


def test_bfloat16_and_int8_run_on_cuda(tiny_llama_dir: Path) -> None:
    """The other dtypes and the quantised base run end to end on the device and stay close to fp32."""
    cases = prompts(seed=22)
    outputs = {}
    for dtype, quantization in (("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int8")):
        engine = LLMEngine.from_pretrained(
            tiny_llama_dir,
            EngineConfig(kv_cache_bytes=1 << 24, device="cuda", dtype=dtype, quantization=quantization),  # type: ignore[arg-type]
        )
        outputs[(dtype, quantization)] = engine.generate(
            [p for p, _ in cases], SamplingParams(max_new_tokens=8, ignore_eos=True)
        )
    exact = outputs[("float32", "none")]
    for key, got in outputs.items():
        first_tokens = sum(g[0] == e[0] for g, e in zip(got, exact, strict=True))
        # The first token is an argmax over the same logits up to rounding: nearly all must agree.
        assert first_tokens >= len(cases) - 2, f"{key}: {first_tokens}/{len(cases)} first tokens agree"
