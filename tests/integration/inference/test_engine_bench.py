"""The engine benchmark's two replays do the work they claim on the tiny model: its figures mean something."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from bench import engine_bench, workload
from services.inference.engine.llm_engine import EngineConfig, LLMEngine


def test_both_replays_generate_every_requested_token_and_ours_matches_generate(tiny_llama_dir: Path) -> None:
    spec = workload.WorkloadSpec(n=6, rate=40.0, input_len=(3, 30), output_len=(2, 12), vocab_size=500)
    requests = workload.generate(spec)
    assert requests[-1].arrival_s > 0, "arrivals are spread out, so the replay has to honour them"
    engine = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(max_num_seqs=4, kv_cache_bytes=1 << 22))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32, attn_implementation="sdpa")

    ours = engine_bench.run_ours(engine, requests)
    static = engine_bench.run_hf(hf, requests, batch_size=4)

    wanted = {r.request_id: r.max_new_tokens for r in requests}
    assert {rid: len(t) for rid, t in ours["outputs"].items()} == wanted
    assert {rid: len(t) for rid, t in static["outputs"].items()} == wanted
    assert ours["tokens"] == static["tokens"] == sum(wanted.values())
    assert 0 < ours["ttft_p50_s"] <= ours["ttft_p90_s"] < ours["elapsed_s"]
    # The last request cannot finish before it arrives.
    assert ours["elapsed_s"] >= requests[-1].arrival_s and static["elapsed_s"] >= requests[-1].arrival_s
    # Each prompt alone, EOS ignored as in the benchmark (an EOS argmax is kept and decoding goes on).
    for r in requests:
        alone = static_batch_of_one(hf, r)
        assert ours["outputs"][r.request_id] == alone, r.request_id
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def static_batch_of_one(hf: object, r: workload.WorkloadRequest) -> list[int]:
    outputs: dict[str, list[int]] = engine_bench.run_hf(hf, [replace(r, arrival_s=0.0)], batch_size=1)[
        "outputs"
    ]
    return outputs[r.request_id]
