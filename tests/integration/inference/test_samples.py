"""n samples of one prompt: the later samples wait for the first one's prompt to be in the KV cache and
then share its full blocks, so n = 4 holds fewer blocks than four separate requests; with a seed the
samples are reproducible run after run."""

from __future__ import annotations

from pathlib import Path

import torch

from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams, Sequence

PROMPT_TOKENS = 64  # 16 full blocks of 4


def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine.from_pretrained(
        tiny_llama_dir, EngineConfig(block_size=4, kv_cache_bytes=1 << 22, max_num_batched_tokens=256)
    )


def run(llm: LLMEngine, seqs: list[Sequence]) -> int:
    """Step until every sequence is done; the most KV blocks in use at once (a shared block once)."""
    bm = llm.block_manager
    peak = 0
    while any(not s.is_finished for s in seqs):
        llm.step()
        peak = max(peak, bm.num_blocks - bm.num_free_blocks)
    return peak


def add_samples(llm: LLMEngine, prompt: list[int], seed: int, *, shared: bool, tag: str) -> list[Sequence]:
    seqs = []
    for i in range(4):
        sampling = SamplingParams(temperature=1.0, seed=seed + i, max_new_tokens=6, ignore_eos=True)
        after = f"{tag}-0" if shared and i else None
        seqs.append(llm.add_request(f"{tag}-{i}", prompt, sampling, after=after))
    return seqs


def test_four_samples_share_the_prompts_blocks_and_are_reproducible(tiny_llama_dir: Path) -> None:
    prompt = torch.randint(5, 500, (PROMPT_TOKENS,), generator=torch.Generator().manual_seed(3)).tolist()

    llm = engine(tiny_llama_dir)
    shared = add_samples(llm, prompt, 100, shared=True, tag="a")
    shared_peak = run(llm, shared)
    hits = llm.block_manager.prefix_hits

    separate_llm = engine(tiny_llama_dir)
    separate = add_samples(separate_llm, prompt, 100, shared=False, tag="b")
    separate_peak = run(separate_llm, separate)

    # Sample 0 prefills 16 full blocks; the three others take 15 from the prefix cache (the last
    # prompt token is always computed: it gives the first token's logits).
    assert hits == 3 * (PROMPT_TOKENS // 4 - 1)
    assert shared_peak < separate_peak, (shared_peak, separate_peak)
    print(f"peak KV blocks: n = 4 {shared_peak}, four requests {separate_peak}")
    # The prompt once, plus each sample's own last prompt block and generated tokens (2 blocks).
    assert shared_peak <= PROMPT_TOKENS // 4 + 4 * 3

    again = engine(tiny_llama_dir)
    repeated = add_samples(again, prompt, 100, shared=True, tag="c")
    run(again, repeated)
    outputs = [s.output_token_ids for s in shared]
    assert outputs == [s.output_token_ids for s in repeated], "same seed, same samples"
    assert len({tuple(o) for o in outputs}) > 1, "the samples differ from one another"
