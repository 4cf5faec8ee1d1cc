"""The README's first command. Until the services land, a smoke run of what exists:
the wire contracts, the gRPC server kit (health + reflection), and the tiny offline model."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path

from services.common.config import ServiceSettings
from services.common.grpc_client import health_status, open_channel, reflected_services
from services.common.grpc_server import GrpcServer
from services.common.log import configure_logging


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


async def _server_smoke() -> None:
    settings = ServiceSettings.model_construct(port=0)
    server = GrpcServer(settings, [], component="smoke")
    port = await server.start()
    async with open_channel(f"127.0.0.1:{port}") as channel:
        print(f"    health: {await health_status(channel)}")
        print(f"    reflection lists: {', '.join(await reflected_services(channel))}")
    await server.stop()


def _model_smoke() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from services.common.tiny_models import build_tiny_model

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # one-second steps; their bars only clutter the demo
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "tiny-llama")
        model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("Hello adapter world", return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False)
        print(f"    tiny random Llama generated: {out[0, ids.shape[1] :].tolist()}")


def run_smoke() -> int:
    configure_logging("demo", level="WARNING", fmt="text")
    # transformers imports torchao when it is installed; its CUDA-only kernels warn on every CPU start.
    for noisy in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    started = time.perf_counter()
    from services.common.proto import SERVICE_NAMES

    _step(f"wire contracts load: {', '.join(sorted(SERVICE_NAMES.values()))}")
    _step("gRPC server kit: start, check health and reflection, stop")
    asyncio.run(_server_smoke())
    _step("tiny offline model: build, load with transformers, generate")
    _model_smoke()
    _step(f"smoke run passed in {time.perf_counter() - started:.1f}s")
    print(
        "The adapter store and attribution services run today (`openlora store serve`, "
        "`openlora attribution serve`); the worker, the gateway, `openlora up` and the full demo "
        "arrive with their issues."
    )
    return 0
