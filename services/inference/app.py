"""Assembles and runs an inference worker: gRPC first (NOT_SERVING), then the model, then SERVING.

Start-up order matters to operators: the health service answers at once (NOT_SERVING, so probes and
the gateway see a live but unready worker); the usage spool is opened and its backlog replayed
before the model loads (it needs no model); the engine process is started, loads the model and
warms up; only then does health report SERVING. If the engine process dies, health turns
NOT_SERVING until its successor is up (too many crashes and the worker exits non-zero). On SIGTERM
the server drains in-flight streams, then the engine stops and the usage reporter gets a last
chance to have the spool acked (whatever stays unacked is replayed at the next start).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from openlora.v1 import adapter_store_pb2_grpc, inference_pb2, inference_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from services.common.app import App
from services.common.errors import Unavailable
from services.common.grpc_client import client_tls
from services.common.settings import MiB
from services.common.trust.setup import service_identity
from services.inference.adapter_cache import AdapterCache
from services.inference.adapters import AdapterResolver
from services.inference.base_model_guard import BaseModelGuard
from services.inference.chat_templates import AdapterTemplates
from services.inference.configs import cache_config, engine_config
from services.inference.engine.dtypes import resolve_dtype
from services.inference.engine.llm_engine import EngineStats
from services.inference.engine.sequence import SamplingParams
from services.inference.engine_process.client import EngineClient, RestartPolicy
from services.inference.engine_process.core import EngineSpec
from services.inference.engine_process.handoff import HandoffWriter
from services.inference.engine_process.protocol import EngineInfo
from services.inference.metrics import AdapterMetrics
from services.inference.relay_server import StreamSink, relay_binding
from services.inference.service import ModelDescription, WorkerService
from services.inference.servicer import InferenceServicer, binding
from services.inference.settings import WorkerSettings
from services.inference.usage.reporter import UsageReporter
from services.inference.usage.spool import UsageSpool
from services.inference.validation import Limits
from services.inference.worker_metrics import WorkerMetrics

log = logging.getLogger("openlora.worker")
SMOLLM2 = "smollm2"


class _Pending(inference_pb2_grpc.InferenceServicer):
    """Answers UNAVAILABLE until the model is loaded, then hands every call to the real servicer."""

    def __init__(self) -> None:
        self.target: InferenceServicer | None = None

    def _ready(self) -> InferenceServicer:
        if self.target is None:
            raise Unavailable("the worker is still loading its model", retry_after_s=1.0)
        return self.target

    async def Generate(
        self, request: inference_pb2.GenerateRequest, context: Any
    ) -> AsyncGenerator[inference_pb2.GenerateChunk]:
        async for chunk in self._ready().Generate(request, context):
            yield chunk

    async def serve(self, request: inference_pb2.GenerateRequest, context: Any, sink: StreamSink) -> None:
        await self._ready().serve(request, context, sink)

    async def ListModels(
        self, request: inference_pb2.ListModelsRequest, context: Any
    ) -> inference_pb2.ListModelsResponse:
        return await self._ready().ListModels(request, context)


# Weights from which a model's steps dwarf the front's work per token (`engine_threads`).
LARGE_MODEL_BYTES = 100 * MiB
# Loop iterations an engine thread that has every core spins before it sleeps (~0.1 ms here).
ALL_CORES_SPIN_COUNT = 100_000


def cores() -> int:
    """The cores this process may use (its CPU affinity)."""
    return len(os.sched_getaffinity(0))


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def default_engine_threads(folder: Path) -> int:
    """Every core for a large model, every core but one (the front's) otherwise: see `engine_threads`."""
    if weights_bytes(folder) >= LARGE_MODEL_BYTES:
        return cores()
    return max(1, cores() - 1)


def model_folder(model: str) -> Path:
    """The folder of `--model`: a local folder, or SmolLM2 prepared into the user cache."""
    if model == SMOLLM2:
        from services.common.smollm2 import prepare_smollm2

        return prepare_smollm2()
    folder = Path(model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model: {model} is not a model folder (no config.json) and not `{SMOLLM2}`")
    return folder


def model_name(settings: WorkerSettings) -> str:
    if settings.model_name:
        return settings.model_name
    if settings.model == SMOLLM2:
        from services.common.smollm2 import MODEL_NAME

        return MODEL_NAME
    return Path(settings.model).resolve().name


class WorkerApp(App):
    """One worker process's parts: listening at once (NOT_SERVING), loading in the background."""

    component = "worker"

    def __init__(self, settings: WorkerSettings, *, tracer_provider: TracerProvider | None = None) -> None:
        super().__init__(settings, tracer_provider=tracer_provider, ready_on_start=False)
        self.settings: WorkerSettings = settings
        self.pending = _Pending()
        self.serve([binding(self.pending)])
        # The gateway's streams arrive over its relay call, counted in the same drain as calls.
        self.serve([relay_binding(self.pending.serve, self.server)])
        self.engine: EngineClient | None = None
        self.handoff: HandoffWriter | None = None
        self.reporter: UsageReporter | None = None
        self.cache: AdapterCache | None = None
        self.metrics = WorkerMetrics(self.registry, self._engine_stats, lambda: self.reporter)
        self._startup: asyncio.Task[None] | None = None
        self._health_task: asyncio.Task[None] | None = None

    def _engine_stats(self) -> EngineStats | None:
        return self.engine.stats() if self.engine is not None else None

    async def on_listening(self, port: int) -> None:
        self._startup = asyncio.get_running_loop().create_task(self._load())

    async def wait_ready(self) -> None:
        """Wait for the model to load and the engine to warm up; raises what made that fail."""
        if self._startup is not None:
            await self._startup
        await super().wait_ready()

    async def _load(self) -> None:
        try:
            await self._start_usage()
            await self._start_engine()
            await self.server.set_ready(True)
        except Exception as exc:
            log.exception("the worker failed to start")
            self.fail(exc)

    async def _start_usage(self) -> None:
        s = self.settings
        if s.attribution_address is None:
            log.warning("attribution_address is not set: usage is not recorded")
            return
        spool = await asyncio.to_thread(UsageSpool, s.spool_dir, max_bytes=s.spool_max_bytes)
        self.reporter = UsageReporter(
            spool,
            s.attribution_address,
            s.worker_id,
            identity=service_identity(s, "worker"),
            tls=client_tls(s, "attribution"),
            flush_interval_s=s.usage_flush_interval_s,
            backoff_s=(0.1, s.usage_backoff_max_s),
        )
        await self.reporter.start()
        if spool.backlog_batches:
            log.info("usage spool: %d batch(es) from an earlier run to send", spool.backlog_batches)

    async def _start_engine(self) -> None:
        s = self.settings
        started = time.perf_counter()
        folder = await asyncio.to_thread(model_folder, s.model)
        config = engine_config(s)
        if s.store_address is not None and s.lora_slots:
            store = self.upstream(s.store_address, audience="store")
            self.cache = AdapterCache(adapter_store_pb2_grpc.AdapterStoreStub(store), cache_config(s))
            await self.cache.start()
            self.handoff = await asyncio.to_thread(HandoffWriter, s.engine_handoff_dir)
        cache = self.cache
        threads = s.engine_threads or default_engine_threads(folder)

        def spec(inbox: str, outbox: str) -> EngineSpec:
            return EngineSpec(
                str(folder),
                dataclasses.asdict(config),
                inbox,
                outbox,
                torch_threads=threads,
                warmup=s.warmup,
                log_level=s.log_level,
            )

        engine = EngineClient(
            spec,
            env=engine_environment(s, threads),
            max_buffered_tokens=s.stream_buffer_tokens,
            stream_interval_s=s.stream_interval_s,
            policy=RestartPolicy(
                max_restarts=s.engine_max_restarts,
                window_s=s.engine_restart_window_s,
                start_timeout_s=s.engine_start_timeout_s,
            ),
            on_down=self._engine_down,
            on_up=self._engine_up,
            on_fatal=self._engine_failed,
        )
        self.engine = engine
        tokenizer_task = asyncio.create_task(asyncio.to_thread(load_tokenizer, folder))
        try:
            info = await engine.start()
        finally:
            tokenizer = await tokenizer_task
        if cache is not None:
            AdapterMetrics(cache, lambda: engine.slots if info.pool is not None else None, self.registry)
        if s.warmup:
            await self._warm_up(info.vocab_size)
        max_context = min(info.max_model_len, info.capacity_tokens)
        if s.max_context is not None:
            max_context = min(max_context, s.max_context)
        guard = None
        if cache is not None and s.store_base_model is not None:
            guard = BaseModelGuard(cache.fetcher, s.store_base_model)
        service = WorkerService(
            engine=engine,
            tokenizer=tokenizer,
            resolver=AdapterResolver(
                cache,
                info.pool,
                self.tracer,
                handoff=self.handoff,
                slots=lambda: engine.slots,
                base_model_guard=guard,
            ),
            reporter=self.reporter,
            metrics=self.metrics,
            limits=Limits(max_context, s.default_max_new_tokens, s.max_new_tokens_limit, info.vocab_size),
            model=ModelDescription(
                name=model_name(s),
                dtype=resolve_dtype(s.dtype, s.device),
                quantization=s.quantization,
                max_context=max_context,
                attention_backend=s.attention_backend,
                lora_op=info.pool.op_name if info.pool is not None else "none",
            ),
            templates=AdapterTemplates(cache.fetcher.info) if cache is not None else None,
            worker_id=s.worker_id,
            tracer=self.tracer,
        )
        self.pending.target = InferenceServicer(service, service.prompter, default_tenant=s.default_tenant)
        log.info(
            "worker ready in %.1fs: model=%s context=%d lora_slots=%d engine_pid=%d torch_threads=%d",
            time.perf_counter() - started,
            service.model.name,
            max_context,
            s.lora_slots,
            info.pid,
            info.torch_threads,
        )

    def _engine_down(self, reason: str) -> None:
        # Out of the pool at once; the gateway retries elsewhere while the engine restarts.
        log.error("the engine process ended (%s): NOT_SERVING until it is back", reason)
        self._spawn_health(False)

    def _engine_up(self, info: EngineInfo) -> None:
        log.warning("the engine process is back (pid %d): SERVING", info.pid)
        self._spawn_health(True)

    def _spawn_health(self, ready: bool) -> None:
        self._health_task = asyncio.get_running_loop().create_task(self.server.set_ready(ready))

    def _engine_failed(self, exc: BaseException) -> None:
        # A worker that cannot keep an engine up must leave the pool: NOT_SERVING now, then exit
        # non-zero after the drain (`run` raises the failure), so its orchestrator steps in.
        log.critical("the engine keeps failing (%s): this worker stops serving and exits", exc)
        self._spawn_health(False)
        self.fail(RuntimeError(f"the engine process keeps failing: {exc}"))

    async def _warm_up(self, vocab_size: int) -> None:
        assert self.engine is not None
        sampling = SamplingParams(max_new_tokens=2, ignore_eos=True)
        async for _ in self.engine.generate("warmup", [i % vocab_size for i in range(1, 9)], sampling):
            pass

    async def release(self) -> None:
        if self._startup is not None and not self._startup.done():
            self._startup.cancel()
            await asyncio.gather(self._startup, return_exceptions=True)
        if self.engine is not None:
            await self.engine.stop()
        if self.reporter is not None:
            await self.reporter.close(self.settings.usage_drain_timeout_s)
            self.reporter = None
        if self.cache is not None:
            await self.cache.close()
            self.cache = None
        if self.handoff is not None:
            self.handoff.close()
            self.handoff = None


def build(settings: WorkerSettings) -> WorkerApp:
    """The worker, not yet listening (build it inside the event loop that will run it)."""
    return WorkerApp(settings)


def engine_environment(settings: WorkerSettings, threads: int) -> dict[str, str]:
    """The engine process's environment: ours, with the OpenMP wait policy the settings choose for an
    engine of `threads` threads."""
    env = dict(os.environ)
    env["OMP_WAIT_POLICY"] = settings.engine_omp_wait_policy.upper()
    if settings.engine_omp_spin_count is not None:
        env["GOMP_SPINCOUNT"] = str(settings.engine_omp_spin_count)
    elif settings.engine_omp_wait_policy == "passive":
        # libgomp spins before sleeping even when passive, unless told; an engine with every core
        # spins briefly, so that its threads need no wake-up between two operators of a step.
        env["GOMP_SPINCOUNT"] = str(ALL_CORES_SPIN_COUNT if threads >= cores() else 0)
    return env


def load_tokenizer(folder: Path) -> Any:
    """The model folder's tokenizer, or None when it has none (token ids only)."""
    if not any(folder.glob("tokenizer*")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
