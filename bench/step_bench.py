"""One full decode step, base-only and with adapters: where P3 of TARGETS.md is decided, next to the
floor this machine's memory sets under the adapters' share.

A decode step reads every weight once. The base model's matmuls have a row per running sequence, so
they are close to compute-bound; each adapter's A and B meet only the rows of its own requests, so the
adapters' share is bound by reading their bytes. This benchmark fills two engines (base-only, and with
every adapter of the batch in a slot) with the workload's requests, lets every prefill finish, and
times decode steps of the full batch on both, alternating rounds. It prints the two step times, what
the adapters add, the adapter bytes one step reads, the memory read rate measured now, hence the least
the adapters could add (`lora_floor_ms`) and the decode-step P3 that floor allows. `lora_bench.py`
gives P3 over whole replays (prefill too); this gives the part that decides it on a CPU.

    .venv/bin/python bench/step_bench.py --model smollm2 --n 64 --rate inf --num-adapters 100 \\
        --rank 16 --input-len 8,64

Prints one JSON line. The requests' output lengths are ignored: each runs until the timed steps end.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoModelForCausalLM

from bench import workload
from bench.engine_bench import decode_flops_per_token, model_dir
from bench.lora_bench import HostAdapter, adapter_name, add_slot_arguments, slot_settings
from bench.machine import cpu_flags, cpu_model, gemm_gflops, memory_read_gbps, set_up_torch
from services.cluster.synthetic_adapters import write_adapter
from services.inference.engine.llm_engine import DTYPES, EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams

Request = workload.WorkloadRequest

WARM_STEPS = 2  # decode steps after the last prefill before the clock runs


def decode_step_ms(
    engine: LLMEngine, requests: list[Request], steps: int, tag: str, with_adapters: bool
) -> list[float]:
    """Each of `steps` decode steps of every request at once, once all their prefills are done."""
    prompt_tokens = sum(len(r.prompt_token_ids) for r in requests)
    prefill_steps = math.ceil(prompt_tokens / engine.config.max_num_batched_tokens) + 1
    sampling = SamplingParams(max_new_tokens=prefill_steps + WARM_STEPS + steps + 1, ignore_eos=True)
    seqs = [
        engine.add_request(
            f"{r.request_id}-{tag}",
            r.prompt_token_ids,
            sampling,
            adapter_key=adapter_name(r.adapter_index) if with_adapters else None,
        )
        for r in requests
    ]
    while any(s.num_output_tokens == 0 for s in seqs):
        engine.step()
    for _ in range(WARM_STEPS):
        engine.step()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        outputs = engine.step()
        times.append((time.perf_counter() - started) * 1000)
        if len(outputs) != len(requests):
            raise RuntimeError(f"a timed step ran {len(outputs)} of {len(requests)} requests")
    while engine.has_unfinished():
        engine.step()
    return times


def adapter_bytes(engine: LLMEngine, rank: int, targets: list[str]) -> int:
    """What one adapter of `rank` on `targets` holds in the slot buffers: the bytes a step reads for
    each distinct adapter of its batch."""
    assert engine.residency is not None
    total = 0
    for name, layer in engine.residency.pool.layers.items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        a, b = layer.lora_a[0, :rank], layer.lora_b[0, :, :rank]
        total += (a.numel() + b.numel()) * a.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated modules")
    parser.add_argument("--lora-slots", type=int, default=64, help="at least the batch's distinct adapters")
    add_slot_arguments(parser)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12, help="timed decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds on each engine, alternating")
    workload.add_arguments(parser)
    args = parser.parse_args()
    set_up_torch(args.threads)
    targets = args.targets.split(",")

    scratch = Path(tempfile.mkdtemp(prefix="step-bench-"))
    path = model_dir(args.model, scratch)
    dtype = DTYPES[args.dtype]
    model_config = json.loads((path / "config.json").read_text())
    requests = workload.generate(workload.spec_from_args(args, int(model_config["vocab_size"])))
    used = sorted({r.adapter_index for r in requests})
    if len(used) > args.lora_slots:
        parser.error(f"the batch names {len(used)} adapters: --lora-slots must be at least that")
    common = {
        "max_num_seqs": len(requests),
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_bytes": args.kv_cache_mib << 20,
        "dtype": args.dtype,
        "enable_prefix_caching": False,  # every round must prefill again
    }
    base = LLMEngine(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), EngineConfig(**common))
    lora_config = EngineConfig(**common, **slot_settings(args, targets))
    lora = LLMEngine(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), lora_config)
    for i in used:
        folder = write_adapter(
            scratch / "adapters" / adapter_name(i), model_config, rank=args.rank, targets=targets, seed=i
        )
        lora.add_adapter(adapter_name(i), HostAdapter(folder, args.rank))

    base_ms: list[float] = []
    lora_ms: list[float] = []
    for round_ in range(args.rounds):  # alternating: both see the host at the same speed
        base_ms.append(statistics.median(decode_step_ms(base, requests, args.steps, f"b{round_}", False)))
        lora_ms.append(statistics.median(decode_step_ms(lora, requests, args.steps, f"l{round_}", True)))
    base_step, lora_step = statistics.median(base_ms), statistics.median(lora_ms)
    step_bytes = len(used) * adapter_bytes(lora, args.rank, targets)
    read_gbps = memory_read_gbps()
    floor_ms = step_bytes / (read_gbps * 1e9) * 1000
    flops = decode_flops_per_token(base.model) * len(requests)
    print(
        json.dumps(
            {
                "bench": "step",
                "model": args.model,
                "dtype": args.dtype,
                "batch": len(requests),
                "num_adapters": args.num_adapters,
                "distinct_adapters": len(used),
                "rank": args.rank,
                "targets": targets,
                "slot_rank": lora_config.lora_max_rank,
                "slot_targets": list(lora_config.lora_target_modules),
                "lora_dtype": lora_config.lora_dtype,
                "base_step_ms": round(base_step, 2),
                "lora_step_ms": round(lora_step, 2),
                "lora_ms": round(lora_step - base_step, 2),
                "base_step_ms_rounds": [round(t, 2) for t in base_ms],
                "lora_step_ms_rounds": [round(t, 2) for t in lora_ms],
                "decode_p3": round(base_step / lora_step, 3),
                "adapter_mb_per_step": round(step_bytes / 1e6, 2),
                "memory_read_gbps": round(read_gbps, 1),
                "lora_floor_ms": round(floor_ms, 3),
                "decode_p3_at_floor": round(base_step / (base_step + floor_ms), 3),
                "base_step_gflops": round(flops / base_step / 1e6, 1),
                "gemm_gflops": round(gemm_gflops(dtype)),
                "cpu": cpu_model(),
                "cpu_flags": cpu_flags(),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
