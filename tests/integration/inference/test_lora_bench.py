"""The multi-LoRA benchmark on the tiny model: one JSON line per setting, every peer doing the work it
claims, and ours matching PEFT per request where both run a request alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench import engine_bench, lora_bench, workload
from services.cluster.synthetic_adapters import write_adapter
from services.inference.engine.llm_engine import EngineConfig, LLMEngine

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_the_benchmark_prints_a_line_per_setting_with_p1_p2_p3() -> None:
    command = [sys.executable, "bench/lora_bench.py", "--model", "tiny", "--n", "12", "--rate", "inf"]
    command += ["--adapter-counts", "5,100", "--alphas", "1", "--repeats", "1", "--output-len", "2,6"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(x["num_adapters"], x["alpha"]) for x in lines] == [(5, 1.0), (100, 1.0)]
    for line in lines:
        assert line["ours_tok_s"] > 0 and line["base_tok_s"] > 0 and line["peft_tok_s"] > 0
        assert line["merge_tok_s"] > 0 and line["p3_ours_over_base"] > 0
        assert line["merges"] == line["distinct_adapters"]  # all arrived at once: one batch per adapter
    assert "p2_ours_over_ours_at_5" in lines[1] and "p1_ours_over_peft" in lines[1]


def test_every_replay_generates_each_requested_token_and_ours_equals_peft_alone(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    spec = workload.WorkloadSpec(
        n=6, rate=float("inf"), num_adapters=3, input_len=(3, 20), output_len=(2, 8), vocab_size=500
    )
    requests = workload.generate(spec)
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    used = sorted({r.adapter_index for r in requests})
    folders = {
        i: write_adapter(tmp_path / lora_bench.adapter_name(i), config, rank=4, targets=["q_proj"], seed=i)
        for i in used
    }
    engine = LLMEngine.from_pretrained(
        tiny_llama_dir, EngineConfig(max_num_seqs=4, kv_cache_bytes=1 << 22, lora_slots=2, lora_max_rank=4)
    )
    for i, folder in folders.items():
        engine.add_adapter(lora_bench.adapter_name(i), lora_bench.HostAdapter(folder, 4))
    ours = engine_bench.run_ours(engine, requests, lambda r: lora_bench.adapter_name(r.adapter_index))

    from peft import PeftModel

    names = [lora_bench.adapter_name(i) for i in used]
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
        str(folders[used[0]]),
        adapter_name=names[0],
    ).eval()
    for i, name in zip(used[1:], names[1:], strict=True):
        peft.load_adapter(str(folders[i]), adapter_name=name)
    mixed = engine_bench.run_hf(peft, requests, 3, lambda r: lora_bench.adapter_name(r.adapter_index))
    merged = lora_bench.run_merge(peft, requests, batch_size=3)
    alone = engine_bench.run_hf(peft, requests, 1, lambda r: lora_bench.adapter_name(r.adapter_index))

    wanted = {r.request_id: r.max_new_tokens for r in requests}
    for result in (ours, mixed, merged, alone):
        assert {rid: len(tokens) for rid, tokens in result["outputs"].items()} == wanted
    assert merged["merges"] >= len(used)
    assert ours["outputs"] == alone["outputs"]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
