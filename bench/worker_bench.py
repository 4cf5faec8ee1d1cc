"""Worker latency: P4 (cold adapter, arrival → resident) and end-to-end time to first token.

Starts SeaweedFS on loopback and the adapter store on it as its own process (`openlora store serve`),
uploads `--adapters` rank-16 adapters on every linear module of the model, and runs a worker in this
process on an empty adapter cache, so each adapter's first request finds it nowhere but in the store.
Requests arrive one at a time (latency, not throughput) from a gRPC client in this process:

- P4: from a request's arrival at the worker to its adapter being resident in host RAM, ready for a
  slot (Get + Download from S3 through the store + digest check + parse), measured around the
  worker's adapter resolution; target p50 ≤ 50 ms for rank 16 on SmolLM2 (bench/../TARGETS.md).
- TTFT as the client sees it, for the base model, a cold adapter and a warm one (host-resident).

    .venv/bin/python bench/worker_bench.py [--model smollm2|PATH] [--adapters 20] [--repeats 20]
        [--targets all-linear|attention] [--adapter-dtype fp32|bf16]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openlora.files import adapter_files
from openlora.transfer import upload
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, common_pb2, inference_pb2, inference_pb2_grpc

from services.cluster.synthetic_adapters import write_adapter
from services.common.grpc_client import open_channel
from services.common.trust.roles import GATEWAY
from services.inference.app import WorkerApp, model_folder
from services.inference.settings import WorkerSettings
from tests.integration.worker.processes import store_process
from tests.kit.seaweedfs import SeaweedFS
from tests.kit.service_auth import as_role, trusted
from tests.kit.service_auth import install as install_service_secret

TARGETS = {
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
}
BASE = "bench-base"
PROMPT = list(range(100, 132))  # 32 tokens


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def summary(name: str, samples: list[float]) -> dict[str, float]:
    return {
        f"{name}_p50_ms": round(statistics.median(samples) * 1000, 1),
        f"{name}_p90_ms": round(percentile(samples, 0.9) * 1000, 1),
    }


async def ttft(stub: inference_pb2_grpc.InferenceAsyncStub, adapter: str | None) -> float:
    message = inference_pb2.GenerateRequest(
        token_ids=inference_pb2.TokenIds(ids=PROMPT),
        sampling=common_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True),
    )
    if adapter is not None:
        message.adapter_ref.id = adapter
    started = time.perf_counter()
    first: float | None = None
    async for _ in stub.Generate(message, timeout=120):
        if first is None:
            first = time.perf_counter() - started
    assert first is not None
    return first


def timed_resolution(worker: WorkerApp, samples: list[tuple[str, float]]) -> None:
    """Record (tier, seconds) of every adapter resolution: arrival at the worker → resident."""
    assert worker.pending.target is not None
    resolver = worker.pending.target.service.resolver
    resolve: Callable[..., Awaitable[Any]] = resolver.resolve

    async def timed(*args: Any) -> Any:
        started = time.perf_counter()
        resolved = await resolve(*args)
        if resolved is not None:
            samples.append((resolved.tier, time.perf_counter() - started))
        return resolved

    resolver.resolve = timed  # type: ignore[method-assign,assignment]


async def run(args: argparse.Namespace, work: Path) -> dict[str, object]:
    model = model_folder(args.model)
    config = json.loads((model / "config.json").read_text())
    with SeaweedFS() as s3:
        store = store_process(work, s3).start()
        try:
            await store.wait_ready()
            adapter_mb = await upload_adapters(store.port, model, config, args, work)
            settings = WorkerSettings(
                port=0,
                model=args.model,
                store_address=f"127.0.0.1:{store.port}",
                attribution_address=None,
                metrics_port=None,
                lora_slots=8,
                lora_max_rank=16,
                kv_cache_bytes=256 << 20,
                cache_dir=work / "adapter-cache",  # empty: every adapter starts cold
                spool_dir=work / "spool",
                log_level="WARNING",
            )
            worker = WorkerApp(settings)
            port = await worker.start()
            await worker.wait_ready()
            resolutions: list[tuple[str, float]] = []
            timed_resolution(worker, resolutions)
            try:
                async with open_channel(f"127.0.0.1:{port}", **as_role(GATEWAY, "worker")) as channel:
                    stub = inference_pb2_grpc.InferenceStub(channel)
                    base = [await ttft(stub, None) for _ in range(args.repeats)]
                    cold = [await ttft(stub, f"a{i}") for i in range(args.adapters)]
                    warm = [await ttft(stub, f"a{i % args.adapters}") for i in range(args.repeats)]
                assert worker.cache is not None
                stats = worker.cache.stats()
            finally:
                await worker.stop()
        finally:
            store.terminate()
    cold_resolution = [s for tier, s in resolutions if tier == "store"]
    return {
        "bench": "worker",
        "model": Path(model).name if args.model != "smollm2" else "SmolLM2-135M-Instruct",
        "adapter": f"rank16 {args.targets} {args.adapter_dtype}",
        "adapter_mb": round(adapter_mb, 2),
        "cold_adapters": len(cold_resolution),
        **summary("p4_arrival_to_resident", cold_resolution),
        "p4_target_p50_ms": 50,
        **summary("cache_store_load", list(stats.load_seconds["store"])),
        **summary("ttft_base", base),
        **summary("ttft_warm_adapter", warm),
        **summary("ttft_cold_adapter", cold),
        "store": "SeaweedFS S3, store in its own process",
    }


async def upload_adapters(
    store_port: int, model: Path, config: dict[str, Any], args: argparse.Namespace, work: Path
) -> float:
    async with open_channel(f"127.0.0.1:{store_port}", **trusted("store")) as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        config_json = (model / "config.json").read_text()
        await stub.RegisterBaseModel(store_pb.RegisterBaseModelRequest(name=BASE, config_json=config_json))
        size = 0
        for i in range(args.adapters):
            folder = write_adapter(work / f"a{i}", config, rank=16, targets=TARGETS[args.targets], seed=i)
            if args.adapter_dtype == "bf16":
                to_bf16(folder / "adapter_model.safetensors")
            size = sum(p.stat().st_size for p in adapter_files(folder))
            header = store_pb.UploadHeader(id=f"a{i}", owner="bench", base_model=BASE)
            await upload(stub, header, adapter_files(folder))
    return size / 1e6


def to_bf16(path: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    tensors = {name: t.to(torch.bfloat16) for name, t in load_file(path).items()}
    save_file(tensors, path, metadata={"format": "pt"})


def main() -> None:
    install_service_secret()  # the worker and the store check who calls them, as in production
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", help="`smollm2` or a model folder")
    parser.add_argument("--adapters", type=int, default=20, help="cold adapters (each loaded once)")
    parser.add_argument("--repeats", type=int, default=20, help="base and warm requests")
    parser.add_argument("--targets", choices=sorted(TARGETS), default="all-linear", help="modules adapted")
    parser.add_argument("--adapter-dtype", choices=["fp32", "bf16"], default="fp32", help="stored weights")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="worker-bench-") as tmp:
        print(json.dumps(asyncio.run(run(args, Path(tmp)))), flush=True)


if __name__ == "__main__":
    main()
