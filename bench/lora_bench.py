"""Multi-LoRA throughput (P1–P3 of TARGETS.md): ours vs PEFT, merge-per-adapter and base-only.

For each number of adapters (and skew α) the workload of `TARGETS.md` is written to JSON lines and the
very same requests are replayed, in one process, by:
- **ours**: `LLMEngine` with LoRA slots; every adapter is in host RAM (the worker's host tier) and is
  copied into a device slot when a request needs it; arrivals are honoured;
- **base**: `LLMEngine` without LoRA on the same requests, adapters ignored (the ceiling, for P3);
- **peft**: one `PeftModel` holding the adapters, static batches of `--batch-size` in arrival order,
  `generate(adapter_names=…)` (mixed-adapter batches);
- **merge**: merge-per-adapter ("one model per adapter"): batch the arrived requests of one adapter,
  merge it into the base weights, generate, unmerge.
The peers load only the adapters the requests name: PEFT's mixed-batch forward loops over the adapters
present in a batch, so adapters that no request names would cost memory and load time, not step time.

One JSON line per setting:

    .venv/bin/python bench/lora_bench.py --model smollm2 --dtype bfloat16 --n 64 --rate inf \\
        --adapter-counts 5,100,1000,2000 --alphas 1

P1 = ours ÷ peft at 100 adapters; P2 = ours at 1000 (2000) ÷ ours at 5 (same run); P3 = ours ÷ base
(the median over `--repeats` alternating runs of ours and base; the slower peers run once).
Adapters are random (A, B ~ N(0, 0.02²), alpha = 2r) with deterministic seeds per index.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from bench import workload
from bench.engine_bench import (
    agreement,
    decode_flops_per_token,
    generate_padded,
    model_dir,
    peak_rss_mib,
    run_hf,
    run_ours,
)
from bench.machine import cpu_flags, cpu_model, gemm_gflops, set_up_torch
from services.cluster.synthetic_adapters import write_adapter
from services.inference.engine.llm_engine import DTYPES, EngineConfig, LLMEngine
from services.inference.engine.lora.weights import peft_pairs

Request = workload.WorkloadRequest


class HostAdapter:
    """An adapter as the worker's host tier holds it: float32 (A, B) pairs per module."""

    def __init__(self, folder: Path, rank: int) -> None:
        self.weights = peft_pairs(load_file(folder / "adapter_model.safetensors"))
        self.rank, self.scaling = rank, 2.0  # write_adapter's alpha is 2r


def adapter_name(index: int) -> str:
    return f"adapter-{index:05d}"


def run_merge(peft: Any, requests: list[Request], batch_size: int) -> dict[str, Any]:
    """One adapter at a time: batch the arrived requests of the oldest waiting request's adapter, merge
    that adapter into the base weights, generate, unmerge."""
    pending = list(requests)
    outputs: dict[str, list[int]] = {}
    merges = 0
    start = time.perf_counter()
    while pending:
        now = time.perf_counter() - start
        if pending[0].arrival_s > now:
            time.sleep(pending[0].arrival_s - now)
            continue
        index = pending[0].adapter_index
        batch = [r for r in pending if r.arrival_s <= now and r.adapter_index == index][:batch_size]
        chosen = {r.request_id for r in batch}
        pending = [r for r in pending if r.request_id not in chosen]
        peft.set_adapter(adapter_name(index))
        peft.merge_adapter()
        try:
            outputs |= generate_padded(peft, batch)
        finally:
            peft.unmerge_adapter()
        merges += 1
    elapsed = time.perf_counter() - start
    return {"tok_s": sum(r.max_new_tokens for r in requests) / elapsed, "outputs": outputs, "merges": merges}


def add_slot_arguments(parser: argparse.ArgumentParser) -> None:
    """The slots' own shape, apart from the adapters' (what a worker left at its defaults serves)."""
    parser.add_argument(
        "--slot-rank", type=int, help="the slots' rank, lora_max_rank (default --rank; the worker's is 64)"
    )
    parser.add_argument(
        "--slot-targets",
        help="modules the slots wrap, comma-separated (default --targets; the worker's: every linear one)",
    )
    parser.add_argument(
        "--lora-dtype", default="float32", choices=["float32", "model"], help="the slots' dtype (lora_dtype)"
    )


def slot_settings(args: argparse.Namespace, targets: list[str]) -> dict[str, Any]:
    """EngineConfig's LoRA fields for these arguments."""
    return {
        "lora_slots": args.lora_slots,
        "lora_max_rank": args.slot_rank or args.rank,
        "lora_target_modules": tuple(args.slot_targets.split(",") if args.slot_targets else targets),
        "lora_dtype": args.lora_dtype,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny | smollm2 | a model folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--adapter-counts", default="5,100,1000,2000", help="comma-separated")
    parser.add_argument("--alphas", default="1,0.3", help="adapter skews, comma-separated")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated modules")
    parser.add_argument(
        "--batch-size", type=int, default=32, help="static batch of the peers = our max_num_seqs"
    )
    parser.add_argument("--lora-slots", type=int, default=32, help="our device slots")
    add_slot_arguments(parser)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-mib", type=int, default=1024)
    parser.add_argument("--peers", default="peft,merge", help="which of peft,merge to run (base always runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="ours and base runs per setting (medians)")
    workload.add_arguments(parser)
    args = parser.parse_args()
    set_up_torch(args.threads)
    peers = {p for p in args.peers.split(",") if p}
    targets = args.targets.split(",")

    scratch = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    path = model_dir(args.model, scratch)
    dtype = DTYPES[args.dtype]
    model_config = json.loads((path / "config.json").read_text())
    common = {
        "max_num_seqs": args.batch_size,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_bytes": args.kv_cache_mib << 20,
        "dtype": args.dtype,
        "enable_prefix_caching": False,  # a repeated replay must not reuse the previous one's prompts
    }
    base_engine = LLMEngine(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), EngineConfig(**common))
    flops_per_token = decode_flops_per_token(base_engine.model)
    gflops = gemm_gflops(dtype)
    lora_config = EngineConfig(**common, **slot_settings(args, targets))
    ours_at_5: dict[float, float] = {}
    for alpha in (float(a) for a in args.alphas.split(",")):
        for count in (int(c) for c in args.adapter_counts.split(",")):
            args.num_adapters, args.alpha = count, alpha
            spec = workload.spec_from_args(args, int(model_config["vocab_size"]))
            requests = workload.generate(spec)
            workload.write_jsonl(scratch / f"workload-{count}-{alpha}.jsonl", spec, requests)
            used = sorted({r.adapter_index for r in requests})
            folders = {
                i: write_adapter(
                    scratch / "adapters" / adapter_name(i),
                    model_config,
                    rank=args.rank,
                    targets=targets,
                    seed=i,
                )
                for i in used
            }
            engine = LLMEngine(AutoModelForCausalLM.from_pretrained(path, dtype=dtype), lora_config)
            for i, folder in folders.items():
                engine.add_adapter(adapter_name(i), HostAdapter(folder, args.rank))
            # Warm-up pays for lazy initialisation (kernels, allocator) outside the timing; it uses one
            # adapter only, so the timed run still loads every other adapter into its slot.
            warm = [dataclasses.replace(r, max_new_tokens=4) for r in requests[: args.batch_size]]
            first = adapter_name(requests[0].adapter_index)
            run_ours(engine, warm, lambda r, first=first: first)  # type: ignore[misc]
            run_ours(base_engine, warm)
            # Alternate ours and base so both see the same share of the shared machine's noise.
            runs = []
            for _ in range(args.repeats):
                ours = run_ours(engine, requests, lambda r: adapter_name(r.adapter_index))
                runs.append((ours, run_ours(base_engine, requests)))
            assert engine.residency is not None
            slot_loads = engine.residency.pool.table.evictions // args.repeats
            ours = {
                k: statistics.median(o[k] for o, _ in runs) for k in ("tok_s", "ttft_p50_s", "ttft_p90_s")
            }
            ours["outputs"] = runs[0][0]["outputs"]
            base_tok_s = statistics.median(b["tok_s"] for _, b in runs)
            p3 = statistics.median(o["tok_s"] / b["tok_s"] for o, b in runs)
            line: dict[str, Any] = {
                "bench": "lora",
                "model": args.model,
                "dtype": args.dtype,
                "num_adapters": count,
                "alpha": alpha,
                "distinct_adapters": len(used),
                "rank": args.rank,
                "targets": targets,
                "slot_rank": lora_config.lora_max_rank,
                "slot_targets": list(lora_config.lora_target_modules),
                "lora_dtype": lora_config.lora_dtype,
                "n": spec.n,
                "rate": "inf" if spec.rate == float("inf") else spec.rate,
                "lora_slots": args.lora_slots,
                "slot_evictions": slot_loads,
                "ours_tok_s": round(ours["tok_s"], 1),
                "repeats": args.repeats,
                "base_tok_s": round(base_tok_s, 1),
                "p3_ours_over_base": round(p3, 3),
                "ttft_p50_ms": round(1000 * ours["ttft_p50_s"], 1),
                "ttft_p90_ms": round(1000 * ours["ttft_p90_s"], 1),
            }
            if count == 5:
                ours_at_5[alpha] = ours["tok_s"]
            elif alpha in ours_at_5:
                line["p2_ours_over_ours_at_5"] = round(ours["tok_s"] / ours_at_5[alpha], 3)
            del engine
            if peers:
                from peft import PeftModel

                names = [adapter_name(i) for i in used]
                peft = PeftModel.from_pretrained(
                    AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa"),
                    str(folders[used[0]]),
                    adapter_name=names[0],
                )
                for i, name in zip(used[1:], names[1:], strict=True):
                    peft.load_adapter(str(folders[i]), adapter_name=name)
                peft.eval()
                generate_padded(peft, warm, adapter_names=[first] * len(warm))
                if "peft" in peers:
                    result = run_hf(peft, requests, args.batch_size, lambda r: adapter_name(r.adapter_index))
                    line["peft_tok_s"] = round(result["tok_s"], 1)
                    line["p1_ours_over_peft"] = round(ours["tok_s"] / result["tok_s"], 2)
                    line["same_tokens_as_peft"] = round(agreement(ours["outputs"], result["outputs"]), 3)
                if "merge" in peers:
                    result = run_merge(peft, requests, args.batch_size)
                    line["merge_tok_s"] = round(result["tok_s"], 1)
                    line["ours_over_merge"] = round(ours["tok_s"] / result["tok_s"], 2)
                    line["merges"] = result["merges"]
                del peft
            line["peak_rss_mib"] = round(peak_rss_mib(), 1)
            # How far the base model is from this machine's matmul rate (each decode token's weights
            # at a large GEMM's speed), measured now: it moves with the CPU.
            line["gemm_gflops"] = round(gflops)
            line["base_ceiling_tok_s"] = round(gflops * 1e9 / flops_per_token)
            line["cpu"], line["cpu_flags"] = cpu_model(), cpu_flags()
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
