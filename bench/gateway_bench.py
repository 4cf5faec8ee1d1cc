"""Gateway hop (P5): time to first token and inter-token latency through the gateway vs direct.

Starts a real worker (`openlora worker serve`) and a gateway in front of it (`openlora gateway serve`),
each its own process, then sends the same base-model requests from a gRPC client in this process,
alternating direct-to-worker and through-gateway (which goes first alternates too), one request at a
time so the two paths never contend. Target: TTFT through the gateway − TTFT direct, p50 ≤ 2 ms.

    .venv/bin/python bench/gateway_bench.py [--model tiny|smollm2|PATH] [--requests 200]
        [--max-new-tokens 16] [--prompt-tokens 32]

Prints one JSON line: per path TTFT and inter-token p50/p90, the TTFT overhead as the median of the
per-pair differences (and as the difference of medians), and the machine's load average.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openlora.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.common.grpc_client import health_status, open_channel
from services.common.trust.roles import GATEWAY
from services.gateway.keys import hash_key, new_key
from tests.kit.ports import free_ports
from tests.kit.service_auth import as_role
from tests.kit.service_auth import install as install_service_secret

OPENLORA = str(Path(sys.executable).parent / "openlora")
WARMUP = 10


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def ms(value: float) -> float:
    return round(value * 1000, 3)


def model_path(spec: str, scratch: Path) -> str:
    if spec == "tiny":
        from services.cluster.tiny_models import build_tiny_model

        return str(build_tiny_model(scratch / "tiny-llama"))
    return spec  # `smollm2` or a folder: the worker resolves it


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)


def tail(log: Path) -> str:
    return log.read_text(errors="replace")[-2000:]


async def wait_serving(
    port: int, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 300
) -> None:
    deadline = time.monotonic() + timeout_s
    async with open_channel(f"127.0.0.1:{port}") as channel:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"process exited:\n{tail(log)}")
            try:
                if await health_status(channel, timeout=1) == "SERVING":
                    return
            except Exception:  # not listening yet
                pass
            await asyncio.sleep(0.2)
    raise SystemExit(f"not serving within {timeout_s:g}s:\n{tail(log)}")


async def timed_stream(
    stub: inference_pb2_grpc.InferenceAsyncStub, request: inference_pb2.GenerateRequest, metadata: Any
) -> tuple[float, list[float]]:
    """(time to first token, gaps between token-carrying chunks) of one call."""
    started = time.perf_counter()
    stamps: list[float] = []
    async for chunk in stub.Generate(request, metadata=metadata, timeout=120):
        if chunk.token_ids:
            stamps.append(time.perf_counter())
    if not stamps:
        raise RuntimeError("a stream carried no tokens")
    return stamps[0] - started, [b - a for a, b in itertools.pairwise(stamps)]


async def bench(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    model = model_path(args.model, scratch)
    worker_port, gateway_port, store_port, attribution_port = free_ports(4)
    key = new_key()
    keys = json.dumps({"keys": [{"sha256": hash_key(key), "tenant": "bench"}]})
    worker_log, gateway_log = scratch / "worker.log", scratch / "gateway.log"
    worker_argv = [OPENLORA, "worker", "serve", "--model", model, "--port", str(worker_port)]
    worker_argv += [
        "--metrics-port",
        "0",
        "--spool-dir",
        str(scratch / "spool"),
        "--cache-dir",
        str(scratch / "cache"),
    ]
    # Nothing listens there: base-model requests need no store, and usage waits in the spool.
    worker_argv += [
        "--store-address",
        f"127.0.0.1:{store_port}",
        "--attribution-address",
        f"127.0.0.1:{attribution_port}",
    ]
    worker_env = {"OPENLORA_WORKER_LOG_LEVEL": "WARNING", "OPENLORA_WORKER_KV_CACHE_BYTES": str(1 << 26)}
    worker = start(worker_argv, worker_env, worker_log)
    gateway_argv = [
        OPENLORA,
        "gateway",
        "serve",
        "--port",
        str(gateway_port),
        "--workers",
        f"127.0.0.1:{worker_port}",
    ]
    gateway_argv += ["--store-address", "", "--metrics-port", "0"]
    gateway_env = {"OPENLORA_GATEWAY_API_KEYS": keys, "OPENLORA_GATEWAY_LOG_LEVEL": "WARNING"}
    gateway = start(gateway_argv, gateway_env, gateway_log)
    try:
        await wait_serving(worker_port, worker, worker_log)
        await wait_serving(gateway_port, gateway, gateway_log)
        request = inference_pb2.GenerateRequest(
            token_ids=inference_pb2.TokenIds(ids=list(range(100, 100 + args.prompt_tokens))),
            sampling=common_pb2.SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True),
        )
        async with (
            open_channel(f"127.0.0.1:{worker_port}", **as_role(GATEWAY, "worker")) as direct_channel,
            open_channel(f"127.0.0.1:{gateway_port}") as gateway_channel,
        ):
            paths = {
                "direct": (inference_pb2_grpc.InferenceStub(direct_channel), [("x-bench", "direct")]),
                "gateway": (
                    inference_pb2_grpc.InferenceStub(gateway_channel),
                    [("authorization", f"Bearer {key}")],
                ),
            }
            ttft: dict[str, list[float]] = {"direct": [], "gateway": []}
            itl: dict[str, list[float]] = {"direct": [], "gateway": []}
            for index in range(WARMUP + args.requests):
                order = ["direct", "gateway"] if index % 2 == 0 else ["gateway", "direct"]
                for name in order:
                    stub, metadata = paths[name]
                    first, gaps = await timed_stream(stub, request, metadata)
                    if index >= WARMUP:
                        ttft[name].append(first)
                        itl[name].extend(gaps)
    finally:
        for process in (gateway, worker):
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
    pairs = [g - d for g, d in zip(ttft["gateway"], ttft["direct"], strict=True)]
    result: dict[str, Any] = {
        "bench": "gateway",
        "model": args.model,
        "requests": args.requests,
        "prompt_tokens": args.prompt_tokens,
        "max_new_tokens": args.max_new_tokens,
    }
    for name in ("direct", "gateway"):
        result[f"ttft_{name}_p50_ms"] = ms(statistics.median(ttft[name]))
        result[f"ttft_{name}_p90_ms"] = ms(percentile(ttft[name], 0.9))
        result[f"itl_{name}_p50_ms"] = ms(statistics.median(itl[name]))
        result[f"itl_{name}_p90_ms"] = ms(percentile(itl[name], 0.9))
    result["ttft_overhead_p50_ms"] = ms(statistics.median(pairs))
    result["ttft_overhead_p90_ms"] = ms(percentile(pairs, 0.9))
    result["ttft_overhead_of_medians_ms"] = ms(
        statistics.median(ttft["gateway"]) - statistics.median(ttft["direct"])
    )
    result["itl_overhead_p50_ms"] = ms(statistics.median(itl["gateway"]) - statistics.median(itl["direct"]))
    result["p5_met"] = result["ttft_overhead_p50_ms"] <= 2.0
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> None:
    install_service_secret()  # the worker checks who calls it, as in production
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help="tiny (built on the fly), smollm2, or a model folder")
    parser.add_argument("--requests", type=int, default=200, help="requests per path (after warm-up)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as scratch:
        print(json.dumps(asyncio.run(bench(args, Path(scratch)))), flush=True)


if __name__ == "__main__":
    main()
