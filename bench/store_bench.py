"""Adapter store throughput: upload and download MB/s and download latency for a rank-16 SmolLM2 adapter.

Starts SeaweedFS on loopback (or uses the local-directory backend), runs the store in this process on
the real gRPC server kit, and prints one JSON line per backend:

    .venv/bin/python bench/store_bench.py [--backend s3|local|both] [--uploads 5] [--downloads 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from openlora.files import adapter_files
from openlora.transfer import download, upload
from openlora.v1 import adapter_store_pb2 as pb
from openlora.v1 import adapter_store_pb2_grpc, common_pb2

from services.adapter_store.app import build as build_store
from services.adapter_store.settings import StoreSettings
from services.cluster.synthetic_adapters import SMOLLM2_135M_CONFIG, write_adapter
from services.common.grpc_client import open_channel
from tests.kit.seaweedfs import SeaweedFS
from tests.kit.service_auth import install as install_service_secret
from tests.kit.service_auth import trusted

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


async def run(
    settings: StoreSettings, adapter: Path, uploads: int, downloads: int, work: Path
) -> dict[str, object]:
    server = build_store(settings)
    port = await server.start()
    size_mb = sum(p.stat().st_size for p in adapter_files(adapter)) / 1e6
    try:
        async with open_channel(f"127.0.0.1:{port}", **trusted("store")) as channel:
            stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
            await stub.RegisterBaseModel(
                pb.RegisterBaseModelRequest(name="smollm2-135m", config_json=json.dumps(SMOLLM2_135M_CONFIG))
            )
            upload_s = []
            for i in range(uploads):
                started = time.perf_counter()
                await upload(
                    stub, pb.UploadHeader(id=f"bench/a{i}", base_model="smollm2-135m"), adapter_files(adapter)
                )
                upload_s.append(time.perf_counter() - started)
            download_s = []
            for i in range(downloads):
                ref = pb.GetAdapterRequest(adapter=common_pb2.AdapterRef(id=f"bench/a{i % uploads}"))
                started = time.perf_counter()
                await download(stub, ref, work / f"dl{i}")
                download_s.append(time.perf_counter() - started)
    finally:
        await server.stop()
    return {
        "bench": "store",
        "backend": settings.backend,
        "adapter": "smollm2-135m rank16 all-linear fp32",
        "adapter_mb": round(size_mb, 2),
        "uploads": uploads,
        "downloads": downloads,
        "upload_mb_s": round(size_mb / statistics.median(upload_s), 1),
        "download_mb_s": round(size_mb / statistics.median(download_s), 1),
        "download_p50_ms": round(statistics.median(download_s) * 1000, 1),
        "download_p90_ms": round(sorted(download_s)[int(0.9 * (len(download_s) - 1))] * 1000, 1),
        "upload_p50_ms": round(statistics.median(upload_s) * 1000, 1),
    }


def main() -> None:
    install_service_secret()  # the store checks who calls it, as in production
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["s3", "local", "both"], default="s3")
    parser.add_argument("--uploads", type=int, default=5)
    parser.add_argument("--downloads", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="openlora-store-bench-") as tmp:
        work = Path(tmp)
        adapter = write_adapter(
            work / "adapter", SMOLLM2_135M_CONFIG, rank=16, targets=ALL_LINEAR, base_model="smollm2-135m"
        )
        backends = ["s3", "local"] if args.backend == "both" else [args.backend]
        for backend in backends:
            if backend == "s3":
                with SeaweedFS() as s3:
                    settings = StoreSettings(
                        port=0,
                        backend="s3",
                        s3_endpoint_url=s3.endpoint_url,
                        s3_bucket="bench",
                        s3_access_key_id=s3.access_key,
                        s3_secret_access_key=s3.secret_key,
                        log_level="WARNING",
                    )
                    result = asyncio.run(run(settings, adapter, args.uploads, args.downloads, work / "s3"))
            else:
                settings = StoreSettings(
                    port=0, backend="local", local_dir=work / "local", log_level="WARNING"
                )
                result = asyncio.run(run(settings, adapter, args.uploads, args.downloads, work / "local-dl"))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
