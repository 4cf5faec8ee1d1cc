"""Engine throughput: our continuous batching vs `transformers` `generate` in static batches, same requests.

Replays the workload of `TARGETS.md` (base model only; adapter indices are written but ignored) through
`LLMEngine` (at most `--max-num-seqs` running, `--max-num-batched-tokens` per step; both are in the JSON),
honouring each request's arrival time, then through HF `generate` in static batches of
`--batch-size` in arrival order (a batch starts once its last request has arrived and the previous
batch is done; rows are left-padded to the batch's longest prompt and run to its longest output).
Prints one JSON line:

    .venv/bin/python bench/engine_bench.py --model smollm2 --dtype bfloat16 --n 128 --rate inf

Throughput is useful output tokens (each request's own max_new_tokens) per second of makespan, from
the first arrival to the last completion; `ratio` is ours ÷ HF measured in the same process. With
`--repeats R` both run R times alternately and medians are reported (this machine is shared).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from bench import workload
from bench.machine import cpu_flags, cpu_model, gemm_gflops, set_up_torch
from services.inference.engine.llm_engine import DTYPES, EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams, Sequence


def model_dir(name: str, scratch: Path) -> Path:
    if name == "tiny":
        from services.cluster.tiny_models import build_tiny_model

        return build_tiny_model(scratch / "tiny-llama", family="llama")
    if name == "smollm2":
        from services.common.smollm2 import prepare_smollm2

        return prepare_smollm2()
    return Path(name)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _base_model(request: workload.WorkloadRequest) -> str | None:
    return None


def run_ours(
    engine: LLMEngine,
    requests: list[workload.WorkloadRequest],
    adapter_of: Callable[[workload.WorkloadRequest], str | None] = _base_model,
) -> dict[str, Any]:
    """Replay with arrivals honoured: a request is added at the first step boundary after it arrives.
    `adapter_of` names each request's adapter key (the multi-LoRA benchmark); the base model by default."""
    pending = list(requests)  # in arrival order
    seqs: dict[str, Sequence] = {}
    first_token_s: dict[str, float] = {}
    steps = 0
    start = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            sampling = SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True)
            seqs[r.request_id] = engine.add_request(
                r.request_id, r.prompt_token_ids, sampling, adapter_key=adapter_of(r)
            )
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0].arrival_s - now))
            continue
        for out in engine.step():
            if out.request_id not in first_token_s:
                first_token_s[out.request_id] = time.perf_counter() - start
        steps += 1
    elapsed = time.perf_counter() - start
    ttft = sorted(first_token_s[r.request_id] - r.arrival_s for r in requests)
    tokens = sum(s.num_output_tokens for s in seqs.values())
    return {
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tok_s": tokens / elapsed,
        "steps": steps,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "outputs": {rid: list(s.output_token_ids) for rid, s in seqs.items()},
    }


def decode_flops_per_token(model: Any) -> int:
    """A decode token costs ~2 FLOP per weight it multiplies: every linear layer and the LM head, not
    the embedding lookup (`parameters()` counts a tied LM head once, as the embedding)."""
    cfg = model.config
    params = sum(p.numel() for p in model.parameters())
    return int(2 * (params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)))


def generate_padded(model: Any, batch: list[workload.WorkloadRequest], **kwargs: Any) -> dict[str, list[int]]:
    """One static batch: left-padded prompts (as decoder-only generation needs), EOS ignored as our engine
    does, every row run to the batch's longest output; each request's own tokens are returned."""
    width = max(len(r.prompt_token_ids) for r in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
        mask[i, width - len(r.prompt_token_ids) :] = 1
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        do_sample=False,
        max_new_tokens=max(r.max_new_tokens for r in batch),
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
    )
    with torch.inference_mode():
        out = model.generate(
            ids.to(model.device), attention_mask=mask.to(model.device), generation_config=config, **kwargs
        )
    return {
        r.request_id: [int(t) for t in out[i, width : width + r.max_new_tokens]] for i, r in enumerate(batch)
    }


def run_hf(
    model: Any,
    requests: list[workload.WorkloadRequest],
    batch_size: int,
    adapter_of: Callable[[workload.WorkloadRequest], str] | None = None,
) -> dict[str, Any]:
    """Static batches in arrival order; a batch waits for its last request and for the previous batch.
    With `adapter_of`, each row gets its adapter (PEFT's `generate(adapter_names=…)`)."""
    outputs: dict[str, list[int]] = {}
    start = time.perf_counter()
    for b in range(0, len(requests), batch_size):
        batch = requests[b : b + batch_size]
        wait = batch[-1].arrival_s - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        extra = {} if adapter_of is None else {"adapter_names": [adapter_of(r) for r in batch]}
        outputs |= generate_padded(model, batch, **extra)
    elapsed = time.perf_counter() - start
    tokens = sum(r.max_new_tokens for r in requests)  # padded and overrun tokens do not count
    return {"elapsed_s": elapsed, "tokens": tokens, "tok_s": tokens / elapsed, "outputs": outputs}


def agreement(ours: dict[str, list[int]], hf: dict[str, list[int]]) -> float:
    """Fraction of requests whose greedy tokens are identical (a sanity check that both did the work)."""
    same = sum(ours[rid] == hf[rid] for rid in hf)
    return same / len(hf)


def warm_up(engine: LLMEngine, hf: Any, vocab: int) -> None:
    """First calls pay for lazy initialisation (oneDNN kernels, allocator); keep that out of the timing."""
    prompt = [i % vocab for i in range(1, 40)]
    engine.generate([prompt, prompt[:9]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    ids = torch.tensor([prompt, prompt], device=hf.device)
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="tiny | smollm2 | a model folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--quantization", default="none", choices=["none", "int8"], help="ours only")
    parser.add_argument("--batch-size", type=int, default=32, help="HF static batch size")
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="our running-sequence cap (HF keeps --batch-size): a decode step's cost grows far slower than "
        "its row count, and only continuous batching can keep that many rows busy",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="our step token budget: fewer, larger prefill steps (each chunk is attended unpadded)",
    )
    parser.add_argument("--kv-cache-mib", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workload", type=Path, help="replay this JSON-lines file instead of generating one")
    parser.add_argument("--workload-out", type=Path, help="where to write the generated workload")
    workload.add_arguments(parser)
    args = parser.parse_args()
    set_up_torch(args.threads)

    scratch = Path(tempfile.mkdtemp(prefix="engine-bench-"))
    path = model_dir(args.model, scratch)
    dtype = DTYPES[args.dtype]
    ours_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    vocab = int(ours_model.config.vocab_size)
    if args.workload is not None:
        spec, requests = workload.read_jsonl(args.workload)
        workload_file = args.workload
    else:
        spec = workload.spec_from_args(args, vocab)
        requests = workload.generate(spec)
        workload_file = args.workload_out or scratch / "workload.jsonl"
        workload.write_jsonl(workload_file, spec, requests)

    config = EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_bytes=args.kv_cache_mib << 20,
        dtype=args.dtype,
        quantization=args.quantization,
        device=args.device,
        # Random prompts share no prefix, and a repeated replay must not find the previous replay's
        # prompts in the cache: that would skip prefills HF has to do.
        enable_prefix_caching=False,
    )
    engine = LLMEngine(ours_model, config)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(args.device)
    warm_up(engine, hf, vocab)

    ours_runs, hf_runs = [], []
    rss_after_ours = 0.0
    for _ in range(args.repeats):
        ours_runs.append(run_ours(engine, requests))
        rss_after_ours = max(rss_after_ours, peak_rss_mib())
        hf_runs.append(run_hf(hf, requests, args.batch_size))

    def med(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    flops_per_token = decode_flops_per_token(hf)
    ours_tok_s = med(ours_runs, "tok_s")
    # The ceiling: every output token's matmuls at the rate a large GEMM reaches on this machine now.
    gflops = gemm_gflops(dtype) if args.device == "cpu" else None
    ratios = [o["tok_s"] / h["tok_s"] for o, h in zip(ours_runs, hf_runs, strict=True)]
    print(
        json.dumps(
            {
                "bench": "engine",
                "model": args.model,
                "dtype": args.dtype,
                "quantization": args.quantization,
                "n": spec.n,
                "rate": spec.rate if spec.rate != float("inf") else "inf",
                "input_len": list(spec.input_len),
                "output_len": list(spec.output_len),
                "batch_size": args.batch_size,
                "max_num_seqs": args.max_num_seqs,
                "max_num_batched_tokens": args.max_num_batched_tokens,
                "repeats": args.repeats,
                "output_tokens": ours_runs[0]["tokens"],
                "ours_tok_s": round(ours_tok_s, 1),
                "hf_static_tok_s": round(med(hf_runs, "tok_s"), 1),
                "ratio": round(statistics.median(ratios), 2),
                # Each repeat's own ratio: on a shared machine their spread says how far to trust the median.
                "ratios": [round(r, 2) for r in ratios],
                "ttft_p50_ms": round(1000 * med(ours_runs, "ttft_p50_s"), 1),
                "ttft_p90_ms": round(1000 * med(ours_runs, "ttft_p90_s"), 1),
                "ours_steps": ours_runs[0]["steps"],
                "peak_rss_mib_ours": round(rss_after_ours, 1),
                "peak_rss_mib_total": round(peak_rss_mib(), 1),
                "kv_cache_mib": round(engine.kv_cache.num_bytes / 2**20, 1),
                "same_tokens_as_hf": round(agreement(ours_runs[0]["outputs"], hf_runs[0]["outputs"]), 3),
                "gemm_gflops": round(gflops) if gflops is not None else None,
                "ceiling_tok_s": round(gflops * 1e9 / flops_per_token) if gflops is not None else None,
                "threads": args.threads,
                "cpu": cpu_model(),
                "cpu_flags": cpu_flags(),
                "device": args.device,
                "gpu_peak_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)
                if args.device.startswith("cuda")
                else None,
                "workload": str(workload_file),
            }
        )
    )


if __name__ == "__main__":
    main()
