"""`int8` weight-only base quantisation: what it touches, that the engine runs it, what it costs in accuracy.

Accuracy is measured teacher-forced on a fixed English text: the quantised model's next-token argmax
agrees with the unquantised model's at ≥ 90% of positions, and the largest logit error stays under
40% of the logits' standard deviation (measured: 94.4% and 0.19 on the tiny Llama, 93.2% and 0.24 on SmolLM2).
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.quantization import quantize_base_weights
from services.inference.engine.sequence import SamplingParams
from tests.integration.inference.hf_reference import hf_greedy

TEXT = (
    "The adapter store keeps every version of a LoRA adapter. Workers fetch adapters on demand, keep "
    "the popular ones resident, and serve many tenants from one shared base model. Every generated "
    "token is counted once for attribution, so contributors are rewarded for the data they trained on. "
    "A cold adapter never stalls the batch: requests that need it wait while the others keep decoding."
)
MIN_TOP1_AGREEMENT = 0.90
MAX_LOGIT_ERROR = 0.40  # max |Δlogit| / std(logits)


def load(path: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def accuracy(model_dir: Path) -> tuple[float, float]:
    reference = load(model_dir)
    quantised = copy.deepcopy(reference)
    quantize_base_weights(quantised, "int8")
    ids = AutoTokenizer.from_pretrained(model_dir)(TEXT, return_tensors="pt").input_ids
    with torch.inference_mode():
        exact = reference(ids).logits[0]  # [T, vocab]
        approx = quantised(ids).logits[0]
    agreement = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
    error = ((exact - approx).abs().max() / exact.std()).item()
    print(f"{model_dir.name}: int8 top-1 agreement {agreement:.3f}, max logit error / std {error:.3f}")
    return agreement, error


def test_int8_quantises_the_decoder_linears_and_keeps_the_lm_head(tiny_llama_dir: Path) -> None:
    from torchao.quantization import Int8Tensor

    model = load(tiny_llama_dir)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    assert quantize_base_weights(model, "int8") == len(linears) > 0
    modules = dict(model.named_modules())
    assert all(isinstance(modules[n].weight, Int8Tensor) for n in linears)
    assert modules["lm_head"].weight.dtype == torch.float32
    assert quantize_base_weights(model, "none") == 0


def test_int8_accuracy_on_the_tiny_model(tiny_llama_dir: Path) -> None:
    agreement, error = accuracy(tiny_llama_dir)
    assert agreement >= MIN_TOP1_AGREEMENT
    assert error <= MAX_LOGIT_ERROR


@pytest.mark.slow
def test_int8_accuracy_on_smollm2(smollm2_dir: Path) -> None:
    agreement, error = accuracy(smollm2_dir)
    assert agreement >= MIN_TOP1_AGREEMENT
    assert error <= MAX_LOGIT_ERROR


def test_int8_engine_matches_generate_of_the_quantised_model(tiny_llama_dir: Path) -> None:
    """The engine option quantises exactly as `quantize_base_weights` does, under continuous batching."""
    engine = LLMEngine.from_pretrained(
        tiny_llama_dir, EngineConfig(block_size=4, kv_cache_bytes=1 << 22, quantization="int8")
    )
    reference = load(tiny_llama_dir)
    quantize_base_weights(reference, "int8")
    rng = random.Random(11)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(3, 40))] for _ in range(5)]
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=12, ignore_eos=True))
    with torch.inference_mode():
        expected = [hf_greedy(reference, p, 12) for p in prompts]
    # Same int8 weights, but batched rows can round differently from single-prompt rows: allow one
    # diverging request, never a wholesale mismatch.
    same = sum(o == e for o, e in zip(outputs, expected, strict=True))
    assert same >= len(prompts) - 1, f"only {same}/{len(prompts)} greedy outputs match"


def test_unknown_quantization_is_refused() -> None:
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(quantization="fp4")  # type: ignore[arg-type]
