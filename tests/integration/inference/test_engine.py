"""The engine on the tiny Llama: cancellation, request validation, stop rules, sampling, logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from services.common.errors import InvalidArgument
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import FinishReason, SamplingParams
from tests.integration.inference.hf_reference import hf_greedy

PROMPT = [17, 230, 45, 99, 310, 7, 64]


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir: Path) -> object:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)


@pytest.fixture
def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(block_size=4, kv_cache_bytes=1 << 21))


def all_blocks_free(engine: LLMEngine) -> bool:
    engine.block_manager.check_consistency()
    return engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_cancel_mid_stream_frees_blocks_and_spares_the_others(engine: LLMEngine, hf_model: object) -> None:
    engine.add_request("keep", PROMPT, SamplingParams(max_new_tokens=12))
    engine.add_request("drop", list(range(3, 40)), SamplingParams(max_new_tokens=30))
    streamed: dict[str, list[int]] = {"keep": [], "drop": []}
    for _ in range(4):
        for out in engine.step():
            streamed[out.request_id] += out.token_ids
    held = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    cancelled = engine.abort("drop")
    assert cancelled is not None and cancelled.finish_reason is FinishReason.CANCELLED
    assert engine.block_manager.num_blocks - engine.block_manager.num_free_blocks < held
    assert engine.abort("drop") is None, "a finished request cannot be cancelled twice"
    finish = None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == "keep"
            streamed["keep"] += out.token_ids
            finish = out.finish_reason
    assert finish is FinishReason.LENGTH
    assert streamed["keep"] == hf_greedy(hf_model, PROMPT, 12)
    assert len(streamed["drop"]) == 4
    assert all_blocks_free(engine)


def test_a_cancel_reports_the_prompt_tokens_taken_in(tiny_llama_dir: Path) -> None:
    """What a request cancelled before its first token is billed: the prefill chunks computed, the
    prefix found cached, the whole prompt once it generated, and nothing while it only waited."""
    engine = LLMEngine.from_pretrained(
        tiny_llama_dir,
        EngineConfig(block_size=4, kv_cache_bytes=1 << 21, max_num_batched_tokens=8, max_num_seqs=1),
    )
    prompt = list(range(3, 40))  # 37 tokens: five chunks of 8
    engine.add_request("chunked", prompt, SamplingParams(max_new_tokens=4))
    engine.add_request("queued", [5, 6, 7], SamplingParams(max_new_tokens=4))  # behind max_num_seqs=1
    engine.step()
    engine.step()
    chunked, queued = engine.abort("chunked"), engine.abort("queued")
    assert chunked is not None and chunked.prompt_tokens_taken == 16
    assert queued is not None and queued.prompt_tokens_taken == 0

    engine.add_request("again", prompt, SamplingParams(max_new_tokens=4))
    engine.step()  # the first's four blocks of 4 are cached: 16 found, 8 more computed
    again = engine.abort("again")
    assert again is not None and again.prompt_tokens_taken == 24

    engine.add_request("whole", prompt, SamplingParams(max_new_tokens=40))
    while not engine.step():
        pass
    whole = engine.abort("whole")
    assert whole is not None and whole.prompt_tokens_taken == len(prompt)
    assert all_blocks_free(engine)


@pytest.mark.parametrize(
    ("request_id", "prompt", "params", "field"),
    [
        ("dup", PROMPT, SamplingParams(), "request_id"),
        ("empty", [], SamplingParams(), "token_ids"),
        ("negative", [-1, 5], SamplingParams(), "token_ids"),
        ("huge-id", [5, 10**6], SamplingParams(), "token_ids"),
        ("too-long", PROMPT, SamplingParams(max_new_tokens=100_000), "sampling.max_new_tokens"),
    ],
)
def test_bad_requests_name_the_field(
    engine: LLMEngine, request_id: str, prompt: list[int], params: SamplingParams, field: str
) -> None:
    engine.add_request("dup", PROMPT)
    with pytest.raises(InvalidArgument) as err:
        engine.add_request(request_id, prompt, params)
    assert err.value.field == field
    engine.abort("dup")
    assert all_blocks_free(engine)


def test_stop_token_ends_the_request_with_stop(engine: LLMEngine, hf_model: object) -> None:
    expected = hf_greedy(hf_model, PROMPT, 8)
    stop_at = expected[3]
    cut = expected[: expected.index(stop_at) + 1]
    seq = engine.add_request("s", PROMPT, SamplingParams(max_new_tokens=8, stop_token_ids=(stop_at,)))
    while engine.has_unfinished():
        engine.step()
    assert seq.output_token_ids == cut and seq.finish_reason is FinishReason.STOP


def test_eos_stops_unless_ignored(tiny_llama_dir: Path, hf_model: object) -> None:
    expected = hf_greedy(hf_model, PROMPT, 6)
    # Pretend the fourth greedy token is the model's EOS: the engine reads EOS from generation_config.
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.generation_config.eos_token_id = [expected[3]]
    engine = LLMEngine(model, EngineConfig(block_size=4, kv_cache_bytes=1 << 21))
    stops, ignores = (
        engine.generate([PROMPT], SamplingParams(max_new_tokens=6)),
        engine.generate([PROMPT], SamplingParams(max_new_tokens=6, ignore_eos=True)),
    )
    assert stops == [expected[: expected.index(expected[3]) + 1]]
    assert ignores == [expected]


def test_seeded_sampling_reproduces_across_batches(engine: LLMEngine) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=16)
    alone = engine.generate([PROMPT], params)[0]
    noise = SamplingParams(temperature=1.3, max_new_tokens=16)
    engine.add_request("noise-1", list(range(5, 30)), noise)
    engine.step()
    together = engine.generate([PROMPT], params)[0]
    while engine.has_unfinished():
        engine.step()
    assert together == alone
    greedy = engine.generate([PROMPT], SamplingParams(max_new_tokens=16))[0]
    assert engine.generate([PROMPT], SamplingParams(temperature=0.9, top_k=1, max_new_tokens=16))[0] == greedy
    assert alone != greedy, "temperature 1 on the random model leaves the greedy path"
    assert all_blocks_free(engine)


def test_logprobs_match_the_reference_model(engine: LLMEngine, hf_model: object) -> None:
    seq = engine.add_request("lp", PROMPT, SamplingParams(max_new_tokens=5, logprobs=True))
    streamed: list[float] = []
    while engine.has_unfinished():
        for out in engine.step():
            streamed += out.logprobs
    ids = torch.tensor([PROMPT + seq.output_token_ids[:-1]])
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(PROMPT) - 1 :]  # type: ignore[operator]
    expected = logits.log_softmax(-1)[torch.arange(5), torch.tensor(seq.output_token_ids)]
    torch.testing.assert_close(torch.tensor(streamed), expected, rtol=1e-4, atol=1e-4)
    assert seq.output_logprobs == streamed


def test_bfloat16_engine_tracks_the_bfloat16_reference(tiny_llama_dir: Path) -> None:
    """bf16 has exact logit ties and different rounding paths, so parity is stated as agreement on
    the first generated tokens (before one flip sends the sequences apart): ≥ 80% of prompts."""
    config = EngineConfig(block_size=4, kv_cache_bytes=1 << 21, dtype="bfloat16")
    engine = LLMEngine.from_pretrained(tiny_llama_dir, config)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    prompts = [[(7 * i + 13 * j) % 500 + 3 for j in range(5 + 3 * i)] for i in range(10)]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=4))
    theirs = [hf_greedy(hf, p, 4) for p in prompts]
    agree = sum(a[:2] == b[:2] for a, b in zip(ours, theirs, strict=True))
    assert agree >= 8, (ours, theirs)
    assert engine.kv_cache.key.dtype == torch.bfloat16


def test_refuses_batch_dependent_rope(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.config.rope_parameters = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    with pytest.raises(ValueError, match="dynamic"):
        LLMEngine(model, EngineConfig(kv_cache_bytes=1 << 20))


def test_stop_string_cuts_the_streamed_text(engine: LLMEngine, hf_model: object) -> None:
    assert engine.tokenizer is not None
    expected_ids = hf_greedy(hf_model, PROMPT, 20)
    full = engine.tokenizer.decode(expected_ids, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    engine.add_request("text", PROMPT, SamplingParams(max_new_tokens=20, stop=(stop,)))
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert "".join(o.text for o in outs) == full[: full.index(stop)]
    assert outs[-1].finish_reason is FinishReason.STOP
    assert all_blocks_free(engine)


def test_stop_strings_need_a_tokenizer(tiny_llama_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=1 << 20))
    with pytest.raises(InvalidArgument) as err:
        engine.add_request("x", PROMPT, SamplingParams(stop=("a",)))
    assert err.value.field == "sampling.stop"


def test_kv_cache_defaults_to_a_share_of_free_memory_capped_by_use(tiny_llama_dir: Path) -> None:
    config = EngineConfig(block_size=16, max_num_seqs=2, kv_cache_memory_fraction=0.5)
    engine = LLMEngine.from_pretrained(tiny_llama_dir, config)
    # Host memory is plentiful here, so the cap wins: two sequences of max_position_embeddings.
    assert engine.block_manager.num_blocks == 2 * engine.max_model_len // 16
    stats = engine.stats()
    assert stats.num_kv_blocks == stats.num_free_kv_blocks == engine.block_manager.num_blocks
    assert stats.kv_cache_bytes == engine.kv_cache.num_bytes and stats.attention_backend == "torch"


def test_stats_follow_the_requests(engine: LLMEngine) -> None:
    system = list(range(3, 23))
    engine.generate([[*system, 1]], SamplingParams(max_new_tokens=2))
    engine.add_request("a", [*system, 2], SamplingParams(max_new_tokens=3))
    engine.add_request("b", [*system, 3], SamplingParams(max_new_tokens=3))
    assert engine.stats().num_waiting == 2
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 2 and stats.num_waiting == 0
    assert stats.prefix_cache_hit_blocks == 10, "both reuse the five full system blocks"
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().num_free_kv_blocks == engine.stats().num_kv_blocks
