"""The gateway hop's own CPU: per request and per chunk, over the worker relay vs one call per stream,
next to what grpcio alone costs for the same calls.

Starts `openlora gateway serve` in front of one stand-in worker process (the gateway tests' fake
worker: real gRPC, no engine, so no model's noise in the figures), then streams `--requests` requests
of `--chunks` token chunks each through the gateway, `--concurrency` at a time, from a gRPC client in
this process. Each round runs once with the worker serving the relay (every stream on one call, the
default), once without it (the gateway falls back to a Generate call per stream), and once against
`bench/grpc_floor_server.py` in the gateway's place (a bare grpc.aio server yielding pre-serialized
chunks: the floor under any gateway written on grpcio), in an order that rotates each round.
Figures: CPU-microseconds per request and per relayed chunk of the gateway (or the floor server), the
worker and the client, medians over `--rounds`; the issue's target is the gateway's ≤ 50 µs per
relayed chunk.

    .venv/bin/python bench/relay_bench.py [--requests 1000] [--chunks 8] [--concurrency 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from bench.gateway_bench import OPENLORA, start, wait_serving
from bench.machine import cpu_flags, steal_seconds
from services.common.grpc_client import open_channel
from services.gateway.keys import hash_key, new_key
from tests.kit.ports import free_ports

WARMUP_REQUESTS = 100


def cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


PATHS = ("relay", "call_per_stream", "grpc_floor")
FLOOR_SERVER = str(Path(__file__).resolve().parent / "grpc_floor_server.py")


async def one_round(args: argparse.Namespace, path: str, scratch: Path) -> dict[str, Any]:
    worker_port, gateway_port = free_ports(2)
    key = new_key()
    keys = json.dumps({"keys": [{"sha256": hash_key(key), "tenant": "bench"}]})
    worker_argv = [sys.executable, "-m", "tests.integration.gateway.fake_worker", "--name", "w"]
    worker_argv += ["--port", str(worker_port), "--delay", str(args.delay_s)]
    if path == "call_per_stream":
        worker_argv.append("--no-relay")
    gateway_argv = [OPENLORA, "gateway", "serve", "--port", str(gateway_port), "--http-port", "0"]
    gateway_argv += ["--workers", f"127.0.0.1:{worker_port}"]
    if path == "grpc_floor":  # the floor server stands where the gateway does; the worker idles
        gateway_argv = [sys.executable, FLOOR_SERVER, "--port", str(gateway_port)]
        gateway_argv += ["--delay-s", str(args.delay_s)]
    gateway_env = {
        "OPENLORA_GATEWAY_API_KEYS": keys,
        "OPENLORA_GATEWAY_LOG_LEVEL": "WARNING",
        "OPENLORA_GATEWAY_MAX_CONCURRENT_STREAMS": str(args.concurrency),
    }
    worker = start(worker_argv, {}, scratch / "worker.log")
    gateway = start(gateway_argv, gateway_env, scratch / "gateway.log")
    try:
        await wait_serving(worker_port, worker, scratch / "worker.log")
        await wait_serving(gateway_port, gateway, scratch / "gateway.log")
        metadata = [("authorization", f"Bearer {key}")]
        request = inference_pb2.GenerateRequest(
            text="a b c", sampling=common_pb2.SamplingParams(max_new_tokens=args.chunks)
        )
        async with open_channel(f"127.0.0.1:{gateway_port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            slots = asyncio.Semaphore(args.concurrency)
            chunks = 0

            async def one() -> None:
                nonlocal chunks
                async with slots:
                    async for _ in stub.Generate(request, metadata=metadata, timeout=120):
                        chunks += 1

            await asyncio.gather(*(one() for _ in range(WARMUP_REQUESTS)))
            processes = {"gateway": psutil.Process(gateway.pid), "worker": psutil.Process(worker.pid)}
            before = {name: cpu_of(p) for name, p in processes.items()}
            client_before, steal_before, started = time.process_time(), steal_seconds(), time.perf_counter()
            chunks = 0
            await asyncio.gather(*(one() for _ in range(args.requests)))
            elapsed = time.perf_counter() - started
            used = {name: cpu_of(p) - before[name] for name, p in processes.items()}
            used["client"] = time.process_time() - client_before
            steal = steal_seconds() - steal_before
    finally:
        for process in (gateway, worker):
            process.terminate()
        for process in (gateway, worker):
            process.wait(timeout=30)
    return {
        "us_per_request": {name: round(s * 1e6 / args.requests, 1) for name, s in used.items()},
        "us_per_chunk": {name: round(s * 1e6 / chunks, 1) for name, s in used.items()},
        "chunks_per_request": chunks / args.requests,
        "requests_per_s": round(args.requests / elapsed, 1),
        "steal_s": round(steal, 2),
    }


def medians(rounds: list[dict[str, Any]], key: str) -> dict[str, float]:
    return {name: statistics.median(r[key][name] for r in rounds) for name in rounds[0][key]}


async def bench(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {path: [] for path in PATHS}
    for index in range(args.rounds):
        shift = index % len(PATHS)  # which goes first rotates: the host drifts over minutes
        for path in PATHS[shift:] + PATHS[:shift]:
            results[path].append(await one_round(args, path, scratch))
    line: dict[str, Any] = {
        "bench": "relay",
        "requests": args.requests,
        "chunks_per_request": results["relay"][0]["chunks_per_request"],
        "concurrency": args.concurrency,
        "rounds": args.rounds,
    }
    for path in PATHS:
        line[path] = {
            "us_per_request": medians(results[path], "us_per_request"),
            "us_per_chunk": medians(results[path], "us_per_chunk"),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in results[path]),
            "steal_s": sum(r["steal_s"] for r in results[path]),
        }
    # The gateway's CPU above grpcio's own for the same calls: what this project's code can still win.
    line["gateway_over_floor_us_per_chunk"] = round(
        line["relay"]["us_per_chunk"]["gateway"] - line["grpc_floor"]["us_per_chunk"]["gateway"], 1
    )
    line["loadavg_1m"] = round(os.getloadavg()[0], 2)
    line["cpu_flags"] = cpu_flags()
    return line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--chunks", type=int, default=8, help="token chunks per request (plus the last)")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--delay-s", type=float, default=0.02, help="between a stream's chunks")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as scratch:
        print(json.dumps(asyncio.run(bench(args, Path(scratch)))), flush=True)


if __name__ == "__main__":
    main()
