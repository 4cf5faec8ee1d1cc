"""The decode-step benchmark on the tiny model: both step times measured, and the adapter bytes a step
reads equal to what the batch's adapter files hold."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from bench import workload
from bench.engine_bench import model_dir
from services.cluster.synthetic_adapters import write_adapter

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_the_benchmark_times_both_steps_and_counts_the_adapter_bytes(tmp_path: Path) -> None:
    workload_flags = ["--n", "8", "--rate", "inf", "--num-adapters", "5", "--input-len", "4,40"]
    command = [sys.executable, "bench/step_bench.py", "--model", "tiny", *workload_flags]
    command += ["--rank", "8", "--steps", "2", "--rounds", "1"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, check=True)
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["batch"] == 8 and line["base_step_ms"] > 0 and line["lora_step_ms"] > 0
    assert line["memory_read_gbps"] > 0 and 0 < line["decode_p3_at_floor"] <= 1

    # The same workload as the benchmark's (seeded), and one adapter file of its shape.
    path = model_dir("tiny", tmp_path)
    config = json.loads((path / "config.json").read_text())
    parser = argparse.ArgumentParser()
    workload.add_arguments(parser)
    args = parser.parse_args(workload_flags)
    requests = workload.generate(workload.spec_from_args(args, int(config["vocab_size"])))
    distinct = len({r.adapter_index for r in requests})
    assert line["distinct_adapters"] == distinct
    folder = write_adapter(tmp_path / "one", config, rank=8, targets=line["targets"], seed=0)
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as tensors:
        one_adapter = sum(tensors.get_tensor(k).numel() * 4 for k in tensors.keys())  # noqa: SIM118
    assert line["adapter_mb_per_step"] == round(distinct * one_adapter / 1e6, 2)
