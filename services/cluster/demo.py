"""`openlora demo` (the README's first command): the whole cluster on embedded defaults, end to end.

1. `openlora up` in a fresh temporary folder (store, attribution, a worker, the gateway);
2. four adapters, made in code (random LoRA weights: stand-ins for real fine-tunes; bring real ones with
   `openlora adapters import hf://org/repo` or `openlora adapters upload FOLDER`), uploaded with their
   provenance: who trained each, on whose data, with what shares;
3. a generation from each adapter, all four streaming concurrently through the gateway, then one from
   an ensemble mix of two adapters;
4. the ledger: usage of every token, and the rewards it earned per contributor.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Unpack

from openlora import AsyncClient, Completion, GenerateOptions, MixComponent
from openlora.v1 import adapter_store_pb2 as store_pb
from openlora.v1 import adapter_store_pb2_grpc, attribution_pb2, attribution_pb2_grpc

from services.cluster.synthetic_adapters import write_adapter
from services.cluster.up import (
    QUIET_MODEL_STACK,
    Cluster,
    ClusterConfig,
    describe,
    serve_until_stopped,
    start_cluster,
    stop_on_signals,
)
from services.common.grpc_client import open_channel
from services.common.trust.setup import operator_identity


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    prompt: str
    trainer: str
    data: tuple[tuple[str, float], ...]  # (data contributor, share)
    seed: int


ADAPTERS = (
    DemoAdapter("poet", "Write a short poem about the sea.", "ana", (("ocean-verse-corpus", 0.3),), 1),
    DemoAdapter("coder", "Write a Python function that adds two numbers.", "bo", (("snippets-db", 0.2),), 2),
    DemoAdapter("chef", "Give me a recipe for a quick lunch.", "chen", (("family-recipes", 0.4),), 3),
    DemoAdapter("tutor", "Explain photosynthesis to a child.", "dara", (("textbook-notes", 0.25),), 4),
)
MIX = (MixComponent("demo/poet", 0.6), MixComponent("demo/chef", 0.4))
MAX_NEW_TOKENS = 24


def step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _chat(text: str, model_dir: Path) -> str:
    """The prompt in the model's chat template when it has one (SmolLM2-Instruct does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        return str(rendered)
    return text


async def upload_adapters(cluster: Cluster, folder: Path) -> None:
    config = json.loads((cluster.model_dir / "config.json").read_text())
    from openlora.files import adapter_files
    from openlora.transfer import upload

    operator = operator_identity(cluster.secret_file)
    async with open_channel(cluster.store, identity=operator, audience="store") as channel:
        stub = adapter_store_pb2_grpc.AdapterStoreStub(channel)
        for adapter in ADAPTERS:
            path = write_adapter(
                folder / adapter.name,
                config,
                rank=8,
                targets=["q_proj", "v_proj"],
                seed=adapter.seed,
                std=0.05,
            )
            trainer_share = 1.0 - sum(share for _, share in adapter.data)
            contributors = [
                store_pb.Contributor(id=adapter.trainer, role=store_pb.TRAINER, share=trainer_share)
            ]
            contributors += [
                store_pb.Contributor(id=who, role=store_pb.DATA, share=s) for who, s in adapter.data
            ]
            header = store_pb.UploadHeader(
                id=f"{cluster.tenant}/{adapter.name}",
                owner=cluster.tenant,
                visibility=store_pb.PUBLIC,
                base_model=cluster.base_model,
                provenance=store_pb.Provenance(
                    trainer=adapter.trainer,
                    datasets=[who for who, _ in adapter.data],
                    contributors=contributors,
                ),
            )
            info = await upload(stub, header, adapter_files(path), timeout=60)
            shares = ", ".join(f"{c.id} {c.share:.0%}" for c in contributors)
            print(f"    {info.id}@{info.version[:12]}…  rank {info.rank}  credited: {shares}")


async def generate_all(cluster: Cluster) -> list[tuple[str, Completion, float]]:
    async with AsyncClient(cluster.gateway, api_key=cluster.api_key) as client:

        async def one(
            label: str, prompt: str, **options: Unpack[GenerateOptions]
        ) -> tuple[str, Completion, float]:
            started = time.perf_counter()
            completion = Completion("")
            first: float | None = None
            options.setdefault("max_new_tokens", MAX_NEW_TOKENS)
            async for chunk in client.stream(prompt, **options):
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - started
                completion.add(chunk)
            return label, completion, first or 0.0

        jobs = [
            one(f"demo/{a.name}", _chat(a.prompt, cluster.model_dir), adapter=f"demo/{a.name}")
            for a in ADAPTERS
        ]
        results = list(await asyncio.gather(*jobs))
        for label, completion, ttft in results:
            print(f"    [{label}] {completion.text.strip()!r}  (first token {ttft * 1000:.0f} ms)")
        step("an ensemble: 0.6 x demo/poet + 0.4 x demo/chef, merged per request (LINEAR)")
        mixed = await one("mix", _chat(ADAPTERS[0].prompt, cluster.model_dir), mix=MIX, strategy="linear")
        print(f"    [poet+chef] {mixed[1].text.strip()!r}")
        return [*results, mixed]


async def show_ledger(cluster: Cluster, expected_tokens: int, timeout_s: float = 60.0) -> None:
    operator = operator_identity(cluster.secret_file)
    async with open_channel(cluster.attribution, identity=operator, audience="attribution") as channel:
        stub = attribution_pb2_grpc.AttributionStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:  # usage is spooled by the worker and acked in batches: wait for the last one
            report = await stub.GetUsage(attribution_pb2.UsageQuery(tenant=cluster.tenant), timeout=10)
            recorded = report.totals.prompt_tokens + report.totals.completion_tokens
            if recorded >= expected_tokens or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
        print(
            f"    usage of tenant {cluster.tenant}: {report.totals.prompt_tokens} prompt + "
            f"{report.totals.completion_tokens} completion tokens in the ledger "
            f"({expected_tokens} streamed: {'all there' if recorded == expected_tokens else 'MISMATCH'})"
        )
        rewards = await stub.GetRewards(attribution_pb2.RewardsQuery(), timeout=10)
        print(f"    rewards ({rewards.currency}), per contributor and adapter:")
        for line in sorted(rewards.lines, key=lambda x: (x.adapter_id, x.contributor_id)):
            who = line.contributor_id or "(unattributed)"
            print(f"      {who:<22} {line.adapter_id:<12} {line.tokens:>8.1f} tokens  {line.amount:>14}")
        print(f"      {'total':<22} {'':<12} {'':>8}         {rewards.total:>14}")
        if recorded != expected_tokens:
            raise RuntimeError(f"the ledger holds {recorded} tokens, {expected_tokens} were streamed")


async def run_demo(model: str = "smollm2", keep: Path | None = None, serve: bool = False) -> int:
    """The tour; with `serve`, the cluster then stays up (its adapters in place) until Ctrl-C."""
    started = time.perf_counter()
    os.environ.update(QUIET_MODEL_STACK)  # the model is prepared in this process
    status = 0
    with tempfile.TemporaryDirectory(prefix="openlora-demo-") as scratch:
        data = keep or Path(scratch)
        step(f"starting the cluster ({model}) in {data}")
        cluster = await start_cluster(
            ClusterConfig(data_dir=data, model=model, gateway_port=0, http_port=0), step
        )
        try:
            step(f"gateway on {cluster.gateway}, API key for tenant {cluster.tenant}: {cluster.api_key}")
            step("uploading four adapters with their provenance")
            await upload_adapters(cluster, data / "demo-adapters")
            step("four adapters streaming concurrently through the gateway")
            results = await generate_all(cluster)
            streamed = sum(c.prompt_tokens + c.completion_tokens for _, c, _ in results)
            step("the ledger: every token, credited to the people behind each adapter")
            await show_ledger(cluster, streamed)
            step(f"demo finished in {time.perf_counter() - started:.0f} s")
            if serve:
                step(
                    "the cluster stays up, with the demo's adapters (demo/poet, demo/chef, ...), until Ctrl-C"
                )
                print(describe(cluster), flush=True)
                status = await serve_until_stopped(cluster, stop_on_signals())
        finally:
            step("stopping the cluster")
            await cluster.supervisor.stop()
    return status
