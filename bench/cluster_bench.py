"""The served path (P8 of TARGETS.md): what a client gets through the cluster vs the engine in process.

Starts the whole cluster as real processes with `openlora up`'s machinery (store, attribution, one
worker per `--workers`, gateway; embedded defaults: local adapter directory, SQLite ledger), uploads
the adapters, and replays the TARGETS workload through the gateway with an API key, arrivals honoured,
one gRPC stream per request. After each served round, with the cluster idle, the very same requests go
through an `LLMEngine` in this process with the worker's engine settings (rounds alternate between the
paths, so both see the host at the same speed). Every served output must equal the in-process one token
for token (greedy) in float32 (`token_identical`); in bfloat16 a matmul's rounding depends on how many
rows share it, so a request's tokens depend on what else ran in its steps, which arrival timing changes
between the paths. One JSON line per run:

    .venv/bin/python bench/cluster_bench.py --model tiny --n 200 --rate inf --num-adapters 100 \\
        --input-len 8,128 --output-len 8,64
    .venv/bin/python bench/cluster_bench.py --model smollm2 --n 64 --rate inf --num-adapters 0 \\
        --input-len 8,64 --output-len 8,32

`--num-adapters 0` serves the base model only. Figures: served and in-process tok/s and their ratio
(P8: ≥ 0.7 tiny, ≥ 0.9 SmolLM2), TTFT p50/p90 of both, and CPU-seconds per 1,000 generated tokens
of each cluster process over the served replay, and of the benchmark's own gRPC client, which shares
the cores (the worker's share outside the model is its CPU minus the in-process engine's), and
what each process burns while the warmed-up cluster idles (`--idle-s`), with the part of the worker
front's per-token figure that idle cost makes at the served rate. Run it on a
quiet machine: it reads `os.getloadavg()` into the line, and the CPU time the hypervisor took away
during each path's rounds (steal), which makes a run's ratio meaningless when large.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc
from transformers import AutoModelForCausalLM

from bench import workload
from bench.engine_bench import model_dir, run_ours
from bench.lora_bench import HostAdapter, adapter_name
from bench.machine import cpu_flags, cpu_model, set_up_torch, steal_seconds, thread_usage
from services.cluster.synthetic_adapters import write_adapter
from services.cluster.up import Cluster, ClusterConfig, start_cluster
from services.common.grpc_client import open_channel
from services.common.trust.setup import operator_identity
from services.inference.engine.llm_engine import DTYPES, EngineConfig, LLMEngine

Request = workload.WorkloadRequest


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The engine settings both paths use, as EngineConfig fields."""
    return {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "kv_cache_bytes": args.kv_cache_mib << 20,
        "dtype": args.dtype,
        "lora_slots": args.lora_slots if args.num_adapters else 0,
        "lora_max_rank": args.rank,
        "lora_target_modules": tuple(args.targets.split(",")),
    }


def worker_environment(settings: dict[str, Any]) -> dict[str, str]:
    """The same settings for the worker processes (they read OPENLORA_WORKER_*; children inherit)."""
    env = {f"OPENLORA_WORKER_{k.upper()}": str(v) for k, v in settings.items() if k != "lora_target_modules"}
    env["OPENLORA_WORKER_LORA_TARGET_MODULES"] = json.dumps(list(settings["lora_target_modules"]))
    return env


async def upload_adapters(cluster: Cluster, folders: dict[int, Path]) -> None:
    operator = operator_identity(cluster.secret_file)
    async with open_channel(cluster.store, identity=operator, audience="store") as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        for index, folder in folders.items():
            # With provenance, so attribution computes rewards as it would in production.
            provenance = store_pb.Provenance(
                trainer=f"trainer-{index % 7}",
                contributors=[
                    store_pb.Contributor(id=f"trainer-{index % 7}", role=store_pb.TRAINER, share=1.0)
                ],
            )
            header = store_pb.UploadHeader(
                id=adapter_name(index),
                owner=cluster.tenant,
                base_model=cluster.base_model,
                provenance=provenance,
            )
            await upload(stub, header, adapter_files(folder))


def cpu_seconds(cluster: Cluster) -> dict[str, float]:
    """User + system CPU of each cluster process so far; a worker's engine process apart (`.engine`)."""
    used = {}
    for child in cluster.supervisor.children:
        process = psutil.Process(child.process.pid)
        times = process.cpu_times()
        used[child.spec.name] = times.user + times.system
        engines = process.children()
        if engines:
            used[child.spec.name + ".engine"] = sum(
                e.cpu_times().user + e.cpu_times().system for e in engines
            )
    return used


# --native: most of a service's time per chunk is in grpc's Cython and C core, invisible otherwise;
# py-spy then pauses each process per sample (it cannot unwind native frames of a running one).
PY_SPY = [str(Path(sys.executable).parent / "py-spy"), "record", "--rate", "250", "--format", "raw"]
PY_SPY += ["--native"]


ThreadUsage = dict[str, dict[str, tuple[float, int, int]]]  # process -> thread kind -> usage


def thread_usages(cluster: Cluster) -> ThreadUsage:
    """`thread_usage` of each cluster process (engine processes apart: one thread kind, the model)."""
    return {child.spec.name: thread_usage(child.process.pid) for child in cluster.supervisor.children}


def thread_deltas(before: ThreadUsage, after: ThreadUsage) -> dict[str, dict[str, list[float]]]:
    return {
        name: {
            kind: [now - then for now, then in zip(usage, before[name].get(kind, (0.0, 0, 0)), strict=True)]
            for kind, usage in kinds.items()
        }
        for name, kinds in after.items()
    }


def thread_figures(served_rounds: list[dict[str, Any]], tokens: int) -> dict[str, dict[str, list[float]]]:
    """Per generated token: µs of CPU, wake-ups and preemptions of each process's kinds of thread."""
    summed: dict[str, dict[str, list[float]]] = {}
    for served in served_rounds:
        for name, kinds in served["threads"].items():
            for kind, usage in kinds.items():
                total = summed.setdefault(name, {}).setdefault(kind, [0.0, 0.0, 0.0])
                for i, value in enumerate(usage):
                    total[i] += value
    return {
        name: {
            kind: [round(s * 1e6 / tokens, 1), round(w / tokens, 3), round(p / tokens, 3)]
            for kind, (s, w, p) in sorted(kinds.items())
        }
        for name, kinds in summed.items()
    }


def is_worker_front(name: str) -> bool:
    """A worker process outside its engine (in `cpu_seconds`' names)."""
    return name.startswith("worker") and not name.endswith(".engine")


def start_profilers(cluster: Cluster, folder: Path) -> list[subprocess.Popen[bytes]]:
    """py-spy on every cluster process (engines too), writing collapsed stacks to `folder/NAME.txt`."""
    folder.mkdir(parents=True, exist_ok=True)
    pids = {}
    for child in cluster.supervisor.children:
        pids[child.spec.name] = child.process.pid
        for engine in psutil.Process(child.process.pid).children():
            pids[child.spec.name + ".engine"] = engine.pid
    return [
        subprocess.Popen(
            [*PY_SPY, "--pid", str(pid), "--output", str(folder / f"{name}.txt")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]


def stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for profiler in profilers:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
    for profiler in profilers:
        profiler.wait(timeout=60)


async def replay_served(cluster: Cluster, requests: list[Request], with_adapters: bool) -> dict[str, Any]:
    """Every request through the gateway at its arrival time; outputs, TTFTs and wall time."""
    metadata = [("authorization", f"Bearer {cluster.api_key}")]
    outputs: dict[str, list[int]] = {}
    ttft: list[float] = []
    chunks = 0
    async with open_channel(cluster.gateway) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        start = time.perf_counter()

        async def one(r: Request) -> None:
            await asyncio.sleep(max(0.0, r.arrival_s - (time.perf_counter() - start)))
            message = inference_pb2.GenerateRequest(
                request_id=r.request_id,
                token_ids=inference_pb2.TokenIds(ids=r.prompt_token_ids),
                sampling=common_pb2.SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True),
            )
            if with_adapters:
                message.adapter_ref.id = adapter_name(r.adapter_index)
            nonlocal chunks
            ids: list[int] = []
            async for chunk in stub.Generate(message, metadata=metadata, timeout=3600):
                chunks += 1
                if chunk.token_ids and not ids:
                    ttft.append(time.perf_counter() - start - r.arrival_s)
                ids.extend(chunk.token_ids)
            outputs[r.request_id] = ids

        await asyncio.gather(*(one(r) for r in requests))
        elapsed = time.perf_counter() - start
    tokens = sum(len(ids) for ids in outputs.values())
    return {
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tok_s": tokens / elapsed,
        "chunks": chunks,
        "ttft": ttft,
        "outputs": outputs,
    }


async def serve_and_measure(
    args: argparse.Namespace,
    rounds: list[list[Request]],
    folders: dict[int, Path],
    scratch: Path,
    local_round: Callable[[list[Request]], dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """Each round replayed through the cluster and then by the in-process engine (`local_round`), in
    turn: this host's speed drifts by tens of percent over minutes, and pairs taken back to back see
    the same host. Per round and path: outputs, rates and CPU; and each process's CPU while the
    warmed-up cluster idles (ms per second), the fixed cost inside every per-token figure."""
    config = ClusterConfig(
        data_dir=scratch / "cluster",
        model=args.model,
        workers=args.workers,
        gateway_port=0,
        http_port=0,
        worker_dtype=args.dtype,
    )
    cluster = await start_cluster(config, lambda text: print(f"[cluster] {text}", file=sys.stderr))
    served_rounds, local_rounds = [], []
    try:
        await upload_adapters(cluster, folders)
        # Warm-up outside the timing: lazy initialisation, and every adapter fetched once from the store
        # into the worker's host RAM, where the in-process engine holds them too.
        await replay_served(cluster, [workload_warm(r) for r in rounds[0]], bool(args.num_adapters))
        await asyncio.sleep(3.0)  # the warm-up's last usage flush and its ledger write settle first
        idle_before, idle_started = cpu_seconds(cluster), time.perf_counter()
        await asyncio.sleep(args.idle_s)
        idle_after, idle_elapsed = cpu_seconds(cluster), time.perf_counter() - idle_started
        idle = {name: 1000 * (idle_after[name] - idle_before[name]) / idle_elapsed for name in idle_after}
        for index, requests in enumerate(rounds):
            folder = args.profile / f"round-{index}" if args.profile else None
            profilers = start_profilers(cluster, folder) if folder else []
            before, threads_before = cpu_seconds(cluster), thread_usages(cluster)
            client_before, steal_before = time.process_time(), steal_seconds()
            served = await replay_served(cluster, requests, bool(args.num_adapters))
            after, threads_after = cpu_seconds(cluster), thread_usages(cluster)
            served["threads"] = thread_deltas(threads_before, threads_after)
            served["steal_s"] = steal_seconds() - steal_before
            stop_profilers(profilers)
            # The client shares the machine's cores with the cluster: its decoding counts too.
            after["client"], before["client"] = time.process_time(), client_before
            served["cpu_s"] = {name: after[name] - before[name] for name in after}
            served_rounds.append(served)
            # The cluster idles meanwhile (its processes wait on sockets), as the engine has the cores.
            local_rounds.append(local_round(requests))
    finally:
        await cluster.supervisor.stop()
    return served_rounds, local_rounds, idle


def round_of(requests: list[Request], index: int, vocab_size: int) -> list[Request]:
    """The workload again with every prompt token shifted, so that a later round reuses no prefix an
    earlier one cached; round 0 is the workload itself."""
    if index == 0:
        return requests
    return [
        dataclasses.replace(
            r,
            request_id=f"{r.request_id}-r{index}",
            prompt_token_ids=[(t + 7919 * index) % vocab_size for t in r.prompt_token_ids],
        )
        for r in requests
    ]


def workload_warm(r: Request) -> Request:
    """A short request on the same adapter; its prompt is reversed so that no prefix it caches is one
    the timed replay could reuse."""
    return dataclasses.replace(
        r,
        request_id=f"warm-{r.request_id}",
        prompt_token_ids=r.prompt_token_ids[::-1],
        max_new_tokens=2,
        arrival_s=0.0,
    )


def in_process(
    args: argparse.Namespace, warm: list[Request], folders: dict[int, Path], path: Path
) -> Callable[[list[Request]], dict[str, Any]]:
    """The in-process engine with the worker's settings, warmed up; it replays one round per call."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype])
    engine = LLMEngine(model, EngineConfig(**engine_settings(args)))
    for index, folder in folders.items():
        engine.add_adapter(adapter_name(index), HostAdapter(folder, args.rank))
    adapter_of = (lambda r: adapter_name(r.adapter_index)) if args.num_adapters else (lambda r: None)
    run_ours(engine, warm, adapter_of)

    def replay(requests: list[Request]) -> dict[str, Any]:
        started, steal_before = time.process_time(), steal_seconds()
        result = run_ours(engine, requests, adapter_of)
        result["cpu_s"] = time.process_time() - started
        result["steal_s"] = steal_seconds() - steal_before
        return result

    return replay


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny | smollm2")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--ranks", default="8,16", help="adapter ranks, assigned round-robin")
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="comma-separated modules")
    parser.add_argument("--lora-slots", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-mib", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the in-process engine")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="replay rounds on each path (later rounds shift prompt tokens so no prefix is reused); "
        "rates are medians over the rounds",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="sample every cluster process with py-spy during the timed replay into this folder "
        "(collapsed stacks; the sampling costs CPU, so figures from such a run are not comparable)",
    )
    parser.add_argument(
        "--idle-s",
        type=float,
        default=10.0,
        help="seconds the warmed-up cluster idles while its CPU is read (clock ticks: ~1 ms/s at 10 s)",
    )
    workload.add_arguments(parser)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",")]
    args.rank = max([args.rank, *ranks])  # the slots' maximum rank
    set_up_torch(args.threads)
    for key, value in worker_environment(engine_settings(args)).items():
        os.environ[key] = value
    # Every request may arrive at once: the tenant's stream limit must not turn the replay into retries.
    os.environ["OPENLORA_GATEWAY_MAX_CONCURRENT_STREAMS"] = str(max(64, args.n))

    scratch = Path(tempfile.mkdtemp(prefix="cluster-bench-"))
    path = model_dir(args.model, scratch)
    model_config = json.loads((path / "config.json").read_text())
    num_adapters = args.num_adapters
    args.num_adapters = max(num_adapters, 1)  # the workload needs an index range; 0 = base only below
    spec = workload.spec_from_args(args, int(model_config["vocab_size"]))
    args.num_adapters = num_adapters
    requests = workload.generate(spec)
    workload.write_jsonl(scratch / "workload.jsonl", spec, requests)
    used = sorted({r.adapter_index for r in requests}) if num_adapters else []
    folders = {
        i: write_adapter(
            scratch / "adapters" / adapter_name(i),
            model_config,
            rank=ranks[i % len(ranks)],
            targets=args.targets.split(","),
            seed=i,
        )
        for i in used
    }

    rounds = [round_of(requests, k, int(model_config["vocab_size"])) for k in range(args.repeats)]
    load_before = os.getloadavg()[0]
    local_round = in_process(args, [workload_warm(r) for r in rounds[0]], folders, path)
    served_rounds, local_rounds, idle = asyncio.run(
        serve_and_measure(args, rounds, folders, scratch, local_round)
    )
    same = sum(
        served["outputs"][r.request_id] == local["outputs"][r.request_id]
        for served, local, round_requests in zip(served_rounds, local_rounds, rounds, strict=True)
        for r in round_requests
    )
    total = args.repeats * len(requests)
    served_rates = [s["tok_s"] for s in served_rounds]
    local_rates = [x["tok_s"] for x in local_rounds]
    tokens = sum(s["tokens"] for s in served_rounds)
    chunks = sum(s["chunks"] for s in served_rounds)
    cpu_s: dict[str, float] = {}
    for served in served_rounds:
        for name, seconds in served["cpu_s"].items():
            cpu_s[name] = cpu_s.get(name, 0.0) + seconds
    per_1k = 1000 / tokens
    cpu = {name: round(seconds * per_1k, 3) for name, seconds in cpu_s.items()}
    front_cpu = sum(seconds for name, seconds in cpu_s.items() if is_worker_front(name))
    ttft = [t for s in served_rounds for t in s["ttft"]]
    # What is billed: prompt and completion tokens.
    usage_tokens = tokens + args.repeats * sum(len(r.prompt_token_ids) for r in requests)
    line = {
        "bench": "cluster",
        "model": args.model,
        "dtype": args.dtype,
        "workers": args.workers,
        "num_adapters": num_adapters,
        "distinct_adapters": len(used),
        "ranks": ranks if num_adapters else [],
        "n": spec.n,
        "rate": "inf" if spec.rate == float("inf") else spec.rate,
        "input_len": list(spec.input_len),
        "output_len": list(spec.output_len),
        "repeats": args.repeats,
        "served_tok_s": round(statistics.median(served_rates), 1),
        "in_process_tok_s": round(statistics.median(local_rates), 1),
        # The median of the rounds' own ratios: each pair ran back to back on the same host.
        "p8_served_over_in_process": round(
            statistics.median(s / x for s, x in zip(served_rates, local_rates, strict=True)), 3
        ),
        "served_tok_s_rounds": [round(x, 1) for x in served_rates],
        "in_process_tok_s_rounds": [round(x, 1) for x in local_rates],
        "served_ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
        "served_ttft_p90_ms": round(1000 * percentile(ttft, 0.9), 1),
        "in_process_ttft_p50_ms": round(1000 * statistics.median(x["ttft_p50_s"] for x in local_rounds), 1),
        "in_process_ttft_p90_ms": round(1000 * statistics.median(x["ttft_p90_s"] for x in local_rounds), 1),
        "tokens": tokens,
        "token_identical": f"{same}/{total}",
        "cpu_s_per_1k_tokens": cpu,
        "in_process_cpu_s_per_1k_tokens": round(
            sum(x["cpu_s"] for x in local_rounds) * 1000 / sum(x["tokens"] for x in local_rounds), 3
        ),
        "chunks": chunks,
        "tokens_per_chunk": round(tokens / chunks, 2),
        # The worker's CPU outside its engine process: the gRPC front (text, usage, streaming).
        "worker_cpu_outside_engine_us_per_token": round(front_cpu * 1e6 / tokens, 1),
        "attribution_cpu_us_per_usage_token": round(cpu_s.get("attribution", 0.0) * 1e6 / usage_tokens, 1),
        "gateway_cpu_us_per_chunk": round(cpu_s.get("gateway", 0.0) * 1e6 / chunks, 1),
        # Where each service's CPU goes by thread (event loop, grpc's core, ZeroMQ, Python threads):
        # µs, wake-ups and preemptions per generated token. Wake-ups, not Python work, make most of it.
        "thread_us_wakeups_preemptions_per_token": thread_figures(served_rounds, tokens),
        # What the idle cluster burns anyway (grpc's threads, timers), and that part of the worker's
        # per-token figure: at a small model's few tokens a second it is a large share.
        "idle_cpu_ms_per_s": {name: round(rate, 2) for name, rate in idle.items()},
        "worker_idle_us_per_token": round(
            sum(rate for name, rate in idle.items() if is_worker_front(name))
            * sum(x["elapsed_s"] for x in served_rounds)
            * 1000
            / tokens,
            1,
        ),
        "loadavg_1m_before": round(load_before, 2),
        "steal_s_served": round(sum(x["steal_s"] for x in served_rounds), 2),
        "steal_s_in_process": round(sum(x["steal_s"] for x in local_rounds), 2),
        "cpu": cpu_model() or platform.machine(),
        "cpu_flags": cpu_flags(),
        "worker_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("OPENLORA_WORKER_")},
    }
    print(json.dumps(line), flush=True)
    if same != total:
        sys.exit(f"{total - same} served output(s) differ from the in-process engine")


if __name__ == "__main__":
    main()
