"""Greedy outputs of the engine equal `transformers` `generate` run on each prompt alone (fp32).

Requests arrive at different steps, prompts are chunked, the KV cache is shrunk until sequences are
preempted and recomputed, and prompts share a system prefix served from the prefix cache: none of it
may change a single token.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.cluster.tiny_models import FAMILIES, Family
from services.inference.engine.kv_cache import KVCacheSpec
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams, Sequence
from tests.integration.inference.hf_reference import hf_greedy

Arrival = tuple[int, list[int], int]
"""(step at which the request arrives, prompt, max_new_tokens)."""


def make_engine(model_dir: Path, **overrides: object) -> LLMEngine:
    settings: dict[str, object] = dict(block_size=4, max_num_batched_tokens=48, kv_cache_bytes=1 << 22)
    settings.update(overrides)
    return LLMEngine.from_pretrained(model_dir, EngineConfig(**settings))  # type: ignore[arg-type]


def kv_bytes_for(model_dir: Path, num_blocks: int, block_size: int = 4) -> int:
    config = AutoModelForCausalLM.from_pretrained(model_dir).config
    return KVCacheSpec.from_model_config(config, block_size, torch.float32).bytes_per_block * num_blocks


def run_staggered(engine: LLMEngine, arrivals: list[Arrival]) -> list[Sequence]:
    pending = sorted(enumerate(arrivals), key=lambda item: item[1][0])
    seqs: dict[int, Sequence] = {}
    step = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][1][0] <= step:
            i, (_, prompt, n) = pending.pop(0)
            seqs[i] = engine.add_request(f"req-{i}", prompt, SamplingParams(max_new_tokens=n))
        engine.step()
        step += 1
        assert step < 5000
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks, "KV blocks leaked"
    bm.check_consistency()
    return [seqs[i] for i in range(len(arrivals))]


def random_arrivals(
    seed: int, count: int, max_prompt: int, shared_prefix: list[int] | None = None
) -> list[Arrival]:
    rng = random.Random(seed)
    arrivals = []
    for _ in range(count):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, max_prompt))]
        if shared_prefix is not None:
            prompt = shared_prefix + prompt
        arrivals.append((rng.randint(0, 12), prompt, rng.randint(1, 24)))
    return arrivals


@pytest.fixture(scope="module")
def reference() -> Callable[[Path, list[Arrival]], list[list[int]]]:
    models: dict[Path, object] = {}

    def expected(model_dir: Path, arrivals: list[Arrival]) -> list[list[int]]:
        if model_dir not in models:
            models[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        return [hf_greedy(models[model_dir], prompt, n) for _, prompt, n in arrivals]

    return expected


@pytest.mark.parametrize("family", FAMILIES)
def test_staggered_chunked_requests_match_generate(
    tiny_model_factory: Callable[[Family], Path],
    reference: Callable[[Path, list[Arrival]], list[list[int]]],
    family: Family,
) -> None:
    model_dir = tiny_model_factory(family)
    # Prompts up to 70 tokens cross the 32-token sliding window of Qwen2 and Mistral.
    arrivals = random_arrivals(seed=1, count=10, max_prompt=70)
    engine = make_engine(model_dir, max_prefill_chunk=9)
    seqs = run_staggered(engine, arrivals)
    assert [s.output_token_ids for s in seqs] == reference(model_dir, arrivals)


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_under_a_tiny_kv_budget_matches_generate(
    tiny_model_factory: Callable[[Family], Path],
    reference: Callable[[Path, list[Arrival]], list[list[int]]],
    family: Family,
) -> None:
    model_dir = tiny_model_factory(family)
    arrivals = random_arrivals(seed=2, count=8, max_prompt=40)
    # 20 blocks of 4 tokens: room for any one request, not for all of them at once.
    engine = make_engine(model_dir, kv_cache_bytes=kv_bytes_for(model_dir, 20))
    assert engine.block_manager.num_blocks == 20
    seqs = run_staggered(engine, arrivals)
    assert engine.scheduler.num_preemptions > 0
    assert [s.output_token_ids for s in seqs] == reference(model_dir, arrivals)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_hits_match_generate(
    tiny_model_factory: Callable[[Family], Path],
    reference: Callable[[Path, list[Arrival]], list[list[int]]],
    family: Family,
) -> None:
    model_dir = tiny_model_factory(family)
    system = [random.Random(3).randrange(3, 500) for _ in range(26)]
    arrivals = random_arrivals(seed=3, count=8, max_prompt=12, shared_prefix=system)
    engine = make_engine(model_dir)
    seqs = run_staggered(engine, arrivals)
    assert engine.block_manager.prefix_hits > 0
    assert any(s.num_cached_tokens >= 24 for s in seqs), "later requests reuse the 6 full system blocks"
    assert [s.output_token_ids for s in seqs] == reference(model_dir, arrivals)


def test_prefix_cache_off_gives_the_same_tokens(tiny_llama_dir: Path) -> None:
    system = list(range(10, 40))
    arrivals = random_arrivals(seed=4, count=6, max_prompt=10, shared_prefix=system)
    cached = run_staggered(make_engine(tiny_llama_dir), arrivals)
    uncached_engine = make_engine(tiny_llama_dir, enable_prefix_caching=False)
    uncached = run_staggered(uncached_engine, arrivals)
    assert uncached_engine.block_manager.prefix_hits == 0
    assert [s.output_token_ids for s in cached] == [s.output_token_ids for s in uncached]
