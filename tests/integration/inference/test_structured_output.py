"""Constrained decoding in the engine: 200 generations of the tiny random model under a JSON schema
(nested objects, enums, arrays) all parse and validate, constrained and free requests share steps,
a regex is matched in full, and logprobs stay the model's own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import torch

from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.output_format import Constraint
from services.inference.engine.sequence import FinishReason, SamplingParams

# Every string, number and array bounded: a random model then always finishes (see constraints.py).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "owner": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1, "maximum": 999},
                "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            },
            "required": ["id", "tags"],
        },
        "scores": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 2},
        "vaccinated": {"type": "boolean"},
    },
    "required": ["name", "kind", "age", "owner", "scores", "vaccinated"],
}


def engine(tiny_llama_dir: Path) -> LLMEngine:
    return LLMEngine.from_pretrained(
        tiny_llama_dir, EngineConfig(block_size=16, kv_cache_bytes=1 << 25, max_num_seqs=64)
    )


def run_all(
    llm: LLMEngine, requests: list[tuple[list[int], SamplingParams]]
) -> list[tuple[str, FinishReason]]:
    text: dict[str, str] = {}
    finish: dict[str, FinishReason] = {}
    for i, (prompt, sampling) in enumerate(requests):
        llm.add_request(f"r{i}", prompt, sampling)
        text[f"r{i}"] = ""
    while llm.has_unfinished():
        for out in llm.step():
            text[out.request_id] += out.text
            if out.finish_reason is not None:
                finish[out.request_id] = out.finish_reason
    return [(text[f"r{i}"], finish[f"r{i}"]) for i in range(len(requests))]


def test_two_hundred_generations_under_a_json_schema_all_validate(tiny_llama_dir: Path) -> None:
    llm = engine(tiny_llama_dir)
    constraint = Constraint("json_schema", json.dumps(SCHEMA))
    g = torch.Generator().manual_seed(0)
    requests = []
    for i in range(200):
        prompt = torch.randint(3, 500, (int(torch.randint(2, 20, (1,), generator=g)),), generator=g).tolist()
        # Half greedy, half sampled: both must stay inside the schema.
        temperature = 0.0 if i % 2 else 1.0
        sampling = SamplingParams(temperature=temperature, seed=i, max_new_tokens=256, constraint=constraint)
        requests.append((prompt, sampling))
    results = run_all(llm, requests)
    for text, finish in results:
        assert finish is FinishReason.STOP, text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in results}) > 50, "the outputs are the model's, not one template"


def test_constrained_and_free_requests_share_a_step_and_logprobs_stay_the_models(
    tiny_llama_dir: Path,
) -> None:
    llm = engine(tiny_llama_dir)
    prompt = [5, 9, 200, 31]
    free = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True)
    regex = SamplingParams(
        max_new_tokens=40, constraint=Constraint("regex", r"[a-c]{3,6}-\d{2}"), logprobs=True
    )
    alone = llm.generate([prompt], free)[0]
    [(free_text, _), (regex_text, regex_finish)] = run_all(llm, [(prompt, free), (prompt, regex)])
    assert re.fullmatch(r"[a-c]{3,6}-\d{2}", regex_text) and regex_finish is FinishReason.STOP
    seq_free = llm.add_request("again", prompt, free)
    while not seq_free.is_finished:
        llm.step()
    assert seq_free.output_token_ids == alone, "a constrained neighbour does not change a free row"
    logprob = seq_free.output_logprobs[0]
    model = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(block_size=16, kv_cache_bytes=1 << 25))
    check = model.add_request("check", prompt, free)
    model.step()
    assert check.output_logprobs[0] == logprob
    assert free_text
