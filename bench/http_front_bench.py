"""What the OpenAI-compatible HTTP front adds to time to first token, against gRPC straight to the worker.

Starts the cluster as real processes (`openlora up`'s machinery) and sends the same requests, one at
a time (latency, not throughput), down three paths in alternating rounds, so each sees the host at
the same speed:

- `grpc_worker`: gRPC straight to the worker, as the gateway's own hop (a gateway token, a tenant);
- `grpc_gateway`: gRPC through the gateway with the API key (what gRPC clients get);
- `http_gateway`: `POST /v1/completions` with `stream: true` through the gateway (what OpenAI SDKs
  and curl get), read with the standard library's HTTP client over one keep-alive connection.

Both clients are lean blocking ones in this process, so the client side costs about the same on every
path; time to first token is from sending the request to reading the first generated token. The
figure issue 18 asks for is the p50 of `http_gateway` minus the p50 of `grpc_worker` (≤ 3 ms).

    .venv/bin/python bench/http_front_bench.py --model tiny --requests 100 --rounds 3

Prints one JSON line. Run it on a quiet machine (the line carries the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from bench.machine import cpu_flags, cpu_model
from services.cluster.up import Cluster, ClusterConfig, start_cluster
from services.common.trust.credentials import ServiceIdentity
from services.common.trust.roles import GATEWAY

WORDS = [
    "the",
    "a",
    "river",
    "mountain",
    "quick",
    "slow",
    "bright",
    "quiet",
    "table",
    "garden",
    "window",
    "music",
    "paper",
    "story",
]


def prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 24))) for _ in range(count)]


def grpc_path(
    target: str, metadata: Callable[[], list[tuple[str, str]]], tenant: str, max_tokens: int
) -> Callable[[str], float]:
    channel = grpc.insecure_channel(target)
    stub = inference_pb2_grpc.InferenceStub(channel)

    def first_token(prompt: str) -> float:
        request = inference_pb2.GenerateRequest(
            text=prompt,
            tenant=tenant,
            sampling=common_pb2.SamplingParams(max_new_tokens=max_tokens, ignore_eos=True),
        )
        started = time.perf_counter()
        first = None
        for chunk in stub.Generate(request, metadata=tuple(metadata()), timeout=60):
            if first is None and chunk.token_ids:
                first = time.perf_counter() - started
        assert first is not None
        return first

    return first_token


def http_path(address: str, api_key: str, model: str, max_tokens: int) -> Callable[[str], float]:
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}

    def first_token(prompt: str) -> float:
        body = json.dumps(
            {
                "model": model,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
        )
        started = time.perf_counter()
        connection.request("POST", "/v1/completions", body, headers)
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
        first = None
        while line := response.readline():
            if first is None and line.startswith(b"data: {"):
                first = time.perf_counter() - started
            if line.startswith(b"data: [DONE]"):
                break
        response.read()  # the chunked body's end: the connection is reused
        assert first is not None
        return first

    return first_token


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(cluster: Cluster, args: argparse.Namespace) -> dict[str, Any]:
    gateway = ServiceIdentity.from_secret_file(cluster.secret_file, GATEWAY)
    paths = {
        "grpc_worker": grpc_path(
            cluster.workers[0], lambda: [gateway.metadata("worker")], cluster.tenant, args.max_tokens
        ),
        "grpc_gateway": grpc_path(
            cluster.gateway,
            lambda: [("authorization", f"Bearer {cluster.api_key}")],
            "",
            args.max_tokens,
        ),
        "http_gateway": http_path(cluster.http, cluster.api_key, cluster.base_model, args.max_tokens),
    }
    texts = prompts(args.requests, args.seed)
    for first_token in paths.values():  # warm every path (connections, caches) before timing
        for prompt in texts[:10]:
            first_token(prompt)
    ttft: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, first_token in paths.items():
            ttft[name] += [first_token(prompt) for prompt in texts]
    p50 = {name: statistics.median(samples) * 1e3 for name, samples in ttft.items()}
    return {
        "ttft_ms_p50": {name: round(value, 3) for name, value in p50.items()},
        "ttft_ms_p90": {name: round(percentile(s, 0.9) * 1e3, 3) for name, s in ttft.items()},
        "http_minus_grpc_worker_ms_p50": round(p50["http_gateway"] - p50["grpc_worker"], 3),
        "http_minus_grpc_gateway_ms_p50": round(p50["http_gateway"] - p50["grpc_gateway"], 3),
        "grpc_gateway_minus_grpc_worker_ms_p50": round(p50["grpc_gateway"] - p50["grpc_worker"], 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="openlora-http-bench-") as scratch:
        config = ClusterConfig(
            data_dir=Path(scratch), model=args.model, gateway_port=0, http_port=0, worker_dtype=args.dtype
        )
        cluster = await start_cluster(config, lambda text: None)
        try:
            return await asyncio.to_thread(measure, cluster, args)
        finally:
            await cluster.supervisor.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny, smollm2 or a model folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--requests", type=int, default=100, help="requests per path and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    load = os.getloadavg()
    result = asyncio.run(run(args))
    line = {
        "bench": "http_front",
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "load_average": [round(x, 2) for x in load],
        "model": args.model,
        "dtype": args.dtype,
        "requests_per_path": args.requests * args.rounds,
        "max_tokens": args.max_tokens,
        **result,
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
