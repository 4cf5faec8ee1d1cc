"""The engine: requests in, tokens out, one step at a time (schedule → run → postprocess)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from services.common.errors import InvalidArgument
from services.inference.engine import attention
from services.inference.engine.block_manager import BlockManager
from services.inference.engine.constraints import (
    ConstraintCompiler,
    ConstraintMatcher,
    ConstraintViolation,
)
from services.inference.engine.detokenizer import IncrementalDetokenizer
from services.inference.engine.dtypes import resolve_dtype, warn_if_slow
from services.inference.engine.kv_cache import KVCacheSpec, PagedKVCache, free_device_memory
from services.inference.engine.lora.pool import DEFAULT_TARGETS, LoRAPool
from services.inference.engine.lora.residency import AdapterResidency, HostAdapter
from services.inference.engine.model_runner import ModelRunner
from services.inference.engine.quantization import QUANTIZATIONS, Quantization, quantize_base_weights
from services.inference.engine.sampler import sample
from services.inference.engine.scheduler import AdapterReady, Scheduler, SchedulerConfig
from services.inference.engine.sequence import FinishReason, SamplingParams, Sequence, TopLogprobs

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# RoPE variants whose frequencies depend on the longest position in the batch: in one ragged row,
# every sequence would be rotated as if it were the longest one.
_BATCH_DEPENDENT_ROPE = {"dynamic", "longrope"}


@dataclass(frozen=True)
class EngineConfig:
    block_size: int = 16
    """Tokens per KV block."""
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    """Token budget of one step (decodes + prefill chunks)."""
    max_prefill_chunk: int | None = None
    """Most prompt tokens one request prefills per step; None means the whole step budget."""
    kv_cache_bytes: int | None = None
    """KV cache size; None takes `kv_cache_memory_fraction` of the device's free memory."""
    kv_cache_memory_fraction: float = 0.2
    enable_prefix_caching: bool = True
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    """`auto` is resolved when the config is made: bfloat16 on CUDA or a CPU with bf16 instructions,
    else float32 (see `dtypes.py`); the config then holds the dtype the engine runs in."""
    device: str = "cpu"
    attention_backend: str = "torch"
    """`torch` (SDPA over the gathered paged context, any device) or `flash_attn` (CUDA, fp16/bf16)."""
    lora_slots: int = 0
    """Device slots for LoRA adapters (0: no multi-LoRA). Requests whose adapters exceed the slots wait
    in LOADING until a slot frees up; slots in use by the running batch are never evicted."""
    lora_max_rank: int = 64
    """Largest adapter rank a slot holds (buffers are allocated at this rank, zero-padded)."""
    lora_target_modules: tuple[str, ...] = DEFAULT_TARGETS
    """Linear modules wrapped for adapters; an adapter touching others is refused."""
    lora_op: str = "auto"
    """`auto`, `segment`, `cpu` or `triton`: what each is and how `auto` picks, in the worker setting
    `lora_op` (`services/inference/settings.py`)."""
    lora_dtype: Literal["float32", "model"] = "float32"
    """The slots' dtype: `float32` keeps adapters as PEFT does on a low-precision model
    (`autocast_adapter_dtype`), `model` stores them in the model's dtype (as vLLM does), halving their
    memory and the bytes a step reads. The `cpu` op (and triton's decode kernels) still sum the delta in
    float32, so with it adapters whose weights are already in that dtype give the same outputs; the
    `segment` op and triton's prefill groups compute in the slots' dtype. No effect on a float32 model."""
    quantization: Quantization = "none"
    """Base-weight quantisation: `int8` stores the decoder's linear weights as int8 (weight-only,
    torchao); activations, KV cache and adapters keep `dtype`."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if not 0 < self.kv_cache_memory_fraction <= 1:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes < 1:
            raise ValueError("kv_cache_bytes must be >= 1")
        if self.lora_slots < 0 or self.lora_max_rank < 1:
            raise ValueError("lora_slots must be >= 0 and lora_max_rank >= 1")
        if self.lora_dtype not in ("float32", "model"):
            raise ValueError(f"lora_dtype must be float32 or model, not {self.lora_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")
        if self.attention_backend == "flash_attn" and self.dtype == "float32":
            raise ValueError("the flash_attn attention backend needs dtype bfloat16 or float16")


@dataclass(frozen=True)
class StepOutput:
    """What one request got from one step: new tokens and, on its last step, why it ended."""

    request_id: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None = None
    text: str = ""
    """Newly final text (only when the engine has a tokenizer); held back while it may still turn
    into a stop string, and cut right before one."""
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    """The alternatives at each token's position, when the request asked for them."""
    prompt_tokens_taken: int = 0
    """On a cancellation: how many prompt tokens the engine had taken in (computed or found cached),
    the prefill a request cancelled before its first token is billed for."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks: int
    num_free_kv_blocks: int
    """Free blocks, cached prefix blocks included (they are reused when needed)."""
    num_cached_kv_blocks: int
    prefix_cache_hit_blocks: int
    num_preemptions: int
    kv_cache_bytes: int
    attention_backend: str


class LLMEngine:
    def __init__(
        self,
        model: Any,
        config: EngineConfig,
        *,
        tokenizer: Any = None,
        adapter_ready: AdapterReady | None = None,
        adapter_lookup: Callable[[str], HostAdapter | None] | None = None,
        request_adapter: Callable[[str], None] | None = None,
        load_tokenizer: Callable[[], Any] | None = None,
    ) -> None:
        """`adapter_lookup(key)` returns an adapter already in host RAM (the worker's adapter cache) and
        `request_adapter(key)` starts loading one in the background; without them, adapters are
        registered up front with `add_adapter` (offline use, tests). Output constraints need the
        vocabulary: `tokenizer`, or `load_tokenizer()` on the first constrained request (without
        either, such requests are refused)."""
        rope = getattr(model.config, "rope_parameters", None) or {}
        if rope.get("rope_type") in _BATCH_DEPENDENT_ROPE:
            raise ValueError(f"rope_type {rope['rope_type']!r} is not supported by the ragged batch")
        self.config = config
        self.device = torch.device(config.device)
        warn_if_slow(config.dtype, self.device)
        self.model = model.to(device=self.device, dtype=DTYPES[config.dtype]).eval()
        quantize_base_weights(self.model, config.quantization)
        self.residency: AdapterResidency | None = None
        self._registered_adapters: dict[str, HostAdapter] = {}
        self._external_adapters = adapter_lookup is not None
        if config.lora_slots:
            if adapter_ready is not None:
                raise ValueError(
                    "adapter_ready comes from the engine's own adapter residency when lora_slots > 0"
                )
            pool = LoRAPool(
                self.model,
                num_slots=config.lora_slots,
                r_max=config.lora_max_rank,
                target_modules=config.lora_target_modules,
                dtype=torch.float32 if config.lora_dtype == "float32" else DTYPES[config.dtype],
                op=config.lora_op,
            )
            self.residency = AdapterResidency(
                pool, adapter_lookup or self._registered_adapters.get, request_adapter or (lambda key: None)
            )
            adapter_ready = self.residency.adapter_ready
        attn_name = attention.register(config.attention_backend)
        self.model.set_attn_implementation(attn_name)
        # transformers only warns for models whose attention is not dispatched through
        # AttentionInterface; running them with use_cache=False would silently attend to one chunk.
        if self.model.config._attn_implementation != attn_name:
            raise ValueError(f"{type(model).__name__} does not route attention through AttentionInterface")
        model_config = self.model.config
        self.vocab_size = int(model_config.vocab_size)
        self.max_model_len = int(getattr(model_config, "max_position_embeddings", 1 << 31))
        spec = KVCacheSpec.from_model_config(model_config, config.block_size, DTYPES[config.dtype])
        budget = config.kv_cache_bytes
        if budget is None:
            budget = int(free_device_memory(self.device) * config.kv_cache_memory_fraction)
        # More blocks than every sequence at full length can use would only be idle memory.
        useful = config.max_num_seqs * -(-self.max_model_len // config.block_size)
        num_blocks = min(spec.num_blocks_for(budget), useful)
        self.kv_cache = PagedKVCache(spec, num_blocks, self.device)
        self.block_manager = BlockManager(
            num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_prefill_chunk=config.max_prefill_chunk,
                eos_token_ids=_eos_token_ids(self.model),
            ),
            self.block_manager,
            adapter_ready=adapter_ready,
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device)
        self.tokenizer = tokenizer
        self._load_tokenizer = load_tokenizer if tokenizer is None else (lambda: tokenizer)
        self._constraints: ConstraintCompiler | None = None
        self._matchers: dict[int, ConstraintMatcher] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._requests: dict[str, Sequence] = {}
        self._batch_ids = itertools.count()
        self.last_step_tokens = 0
        self._generators: dict[int, torch.Generator] = {}
        self._unseeded = torch.Generator(device=self.device)
        self._unseeded.seed()
        log.info(
            "engine ready: attention=%s dtype=%s quantization=%s kv_blocks=%d x %d tokens (%.1f MiB)",
            config.attention_backend,
            config.dtype,
            config.quantization,
            num_blocks,
            config.block_size,
            self.kv_cache.num_bytes / 2**20,
        )

    def add_adapter(self, key: str, adapter: HostAdapter) -> None:
        """Register an adapter held in host RAM under `key` (offline use; the worker uses its cache)."""
        if self.residency is None:
            raise ValueError("this engine has no LoRA slots (EngineConfig.lora_slots = 0)")
        self.residency.pool.check(adapter.weights, adapter.rank)
        self._registered_adapters[key] = adapter

    @classmethod
    def from_pretrained(cls, path: str | Path, config: EngineConfig, **kwargs: Any) -> LLMEngine:
        """Load the model and, when the folder has one, its tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[config.dtype])
        if "tokenizer" not in kwargs and any(Path(path).glob("tokenizer*")):
            kwargs["tokenizer"] = AutoTokenizer.from_pretrained(path)
        return cls(model, config, **kwargs)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams | None = None,
        *,
        adapter_key: str | None = None,
        after: str | None = None,
    ) -> Sequence:
        """Queue a request. `after` names a running request with the same prompt and adapter (another
        sample of it): this one is admitted once that one's prompt is in the KV cache, and then
        shares its full blocks through the prefix cache instead of computing and holding its own."""
        sampling = sampling or SamplingParams()
        if request_id in self._requests:
            raise InvalidArgument("request_id", f"{request_id!r} is already running")
        if not prompt_token_ids:
            raise InvalidArgument("token_ids", "the prompt is empty")
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.vocab_size:
            raise InvalidArgument("token_ids", f"token ids must be in [0, {self.vocab_size})")
        total = len(prompt_token_ids) + sampling.max_new_tokens
        limit = min(self.max_model_len, self.scheduler.capacity_tokens)
        if total > limit:
            raise InvalidArgument(
                "sampling.max_new_tokens",
                f"prompt ({len(prompt_token_ids)}) + max_new_tokens ({sampling.max_new_tokens}) "
                f"exceeds the {limit} tokens this worker can hold for one request",
            )
        if sampling.stop and self.tokenizer is None:
            raise InvalidArgument("sampling.stop", "stop strings need a worker started with a tokenizer")
        if adapter_key is not None:
            if self.residency is None and self.scheduler.adapter_ready is None:
                raise InvalidArgument("adapter", "this worker serves the base model only (no LoRA slots)")
            if (
                self.residency
                and not self._external_adapters
                and adapter_key not in self._registered_adapters
            ):
                raise InvalidArgument(
                    "adapter", f"adapter {adapter_key!r} is not registered with this engine"
                )
        seq = Sequence(request_id, list(prompt_token_ids), sampling, adapter_key=adapter_key)
        if sampling.constraint is not None:
            self._matchers[seq.seq_id] = self._constraint_compiler().matcher(sampling.constraint)
        if after is not None:
            seq.after = self._requests.get(after)
        self.scheduler.add(seq)
        self._requests[request_id] = seq
        if self.tokenizer is not None:
            self._detokenizers[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer, seq.prompt_token_ids, sampling.stop
            )
        return seq

    def _constraint_compiler(self) -> ConstraintCompiler:
        if self._constraints is None:
            if self._load_tokenizer is None:
                raise InvalidArgument("response_format", "output constraints need an engine with a tokenizer")
            # Once per engine, on the first constrained request: the vocabulary's tables (~0.1-0.3 s).
            eos = self.scheduler.config.eos_token_ids or None
            self._constraints = ConstraintCompiler(self._load_tokenizer(), self.vocab_size, eos)
        return self._constraints

    def abort(self, request_id: str) -> StepOutput | None:
        """Cancel a request; its KV blocks are free on return. None if it is unknown or done."""
        seq = self.scheduler.abort(request_id)
        if seq is None:
            return None
        self._forget(seq)
        self._release_idle_pins()
        return StepOutput(
            request_id, [], [], FinishReason.CANCELLED, prompt_tokens_taken=seq.num_prompt_tokens_taken
        )

    def _release_idle_pins(self) -> None:
        """With nothing left running, drop the pins of the last requests now: no step may come to do it,
        and until one does, `/metrics` shows their slots pinned."""
        if self.residency is not None and not self.scheduler.running:
            self.residency.sync(())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        """A snapshot for metrics and `ListModels` (read it on the step thread, or accept a torn read)."""
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks=bm.num_blocks,
            num_free_kv_blocks=bm.num_free_blocks,
            num_cached_kv_blocks=bm.num_cached_blocks,
            prefix_cache_hit_blocks=bm.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            kv_cache_bytes=self.kv_cache.num_bytes,
            attention_backend=self.config.attention_backend,
        )

    def step(self) -> list[StepOutput]:
        """One iteration: schedule → run → postprocess. Sets `last_step_tokens` (0: nothing ran)."""
        if self.residency is not None:
            # Release the slots of requests that finished or were aborted since the last step first:
            # otherwise their pins would keep a waiting request's adapter out when nothing else runs.
            self.residency.sync(self.scheduler.running)
        scheduled = self.scheduler.schedule()
        self.last_step_tokens = scheduled.num_batched_tokens
        if scheduled.is_empty:
            return []
        if self.residency is None:
            batch = self.runner.prepare(scheduled)
            logits = self.runner.execute(batch)
        else:
            self.residency.sync(self.scheduler.running)
            # Each adapter's tokens must be contiguous: reorder the step (postprocess follows this order).
            scheduled.chunks, lora_step = self.residency.step_for(scheduled.chunks)
            batch = self.runner.prepare(scheduled)
            with self.residency.pool.step(lora_step):
                logits = self.runner.execute(batch)
        seqs = batch.sampling_seqs
        sampled = sample(
            logits,
            [s.sampling for s in seqs],
            [self._generator(s) for s in seqs],
            seqs,
            self._masker(seqs) if self._matchers else None,
        )
        updated = self.scheduler.postprocess(
            scheduled, sampled.token_ids, sampled.logprobs, sampled.top_logprobs
        )
        self._release_idle_pins()
        if self._matchers:
            self._advance_constraints(updated)
        outputs = []
        for seq in updated:
            text = self._detokenize(seq)
            sampling = seq.sampling
            logprobs = seq.output_logprobs[-1:] if sampling.logprobs else []
            top = seq.output_top_logprobs[-1:] if sampling.logprobs and sampling.top_logprobs else []
            outputs.append(
                StepOutput(seq.request_id, seq.output_token_ids[-1:], logprobs, seq.finish_reason, text, top)
            )
            if seq.is_finished:
                self._forget(seq)
        return outputs

    def _masker(self, seqs: list[Sequence]) -> Callable[[torch.Tensor], None] | None:
        """What masks the constrained rows of a step's logits (None when no row is constrained)."""
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self._matchers]
        if not rows:
            return None
        matchers = [self._matchers[seqs[i].seq_id] for i in rows]
        compiler = self._constraint_compiler()
        return lambda logits: compiler.apply_masks(logits, rows, matchers)

    def _advance_constraints(self, updated: list[Sequence]) -> None:
        """Feed each constrained sequence its token; one whose output is complete (nothing but EOS
        may follow) ends with STOP now, even under `ignore_eos`, rather than sample a forced EOS."""
        for seq in updated:
            matcher = self._matchers.get(seq.seq_id)
            if matcher is None:
                continue
            try:
                matcher.accept(seq.output_token_ids[-1])
            except ConstraintViolation:  # a bug, not the request's fault: end it, keep the engine up
                log.exception("request %s left its output constraint; ending it", seq.request_id)
                self.scheduler.finish(seq, FinishReason.STOP)
                continue
            if matcher.is_finished and not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.STOP)

    def _detokenize(self, seq: Sequence) -> str:
        detokenizer = self._detokenizers.get(seq.seq_id)
        if detokenizer is None:
            return ""
        text = detokenizer.add(seq.output_token_ids[-1])
        if detokenizer.stopped:
            self.scheduler.finish(seq, FinishReason.STOP)
        elif seq.is_finished:
            text += detokenizer.flush()
        return text

    def generate(self, prompts: list[list[int]], sampling: SamplingParams | None = None) -> list[list[int]]:
        """Run prompts to completion together (for tests and offline use); output ids per prompt."""
        batch = next(self._batch_ids)
        seqs = [self.add_request(f"generate-{batch}-{i}", p, sampling) for i, p in enumerate(prompts)]
        while any(not s.is_finished for s in seqs):
            self.step()
        return [list(s.output_token_ids) for s in seqs]

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.sampling.greedy:
            return None
        if seq.sampling.seed is None:
            return self._unseeded
        gen = self._generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.sampling.seed)
            self._generators[seq.seq_id] = gen
        return gen

    def _forget(self, seq: Sequence) -> None:
        self._requests.pop(seq.request_id, None)
        self._matchers.pop(seq.seq_id, None)
        self._generators.pop(seq.seq_id, None)
        self._detokenizers.pop(seq.seq_id, None)


def _eos_token_ids(model: Any) -> tuple[int, ...]:
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list | tuple) else (int(eos),)
