"""The engine's and the adapter cache's configs, each made from the worker's settings by one function.

Each table names the setting every config field comes from; fields not in a table keep the config's
own default on purpose (they are tuning knobs of tests and benchmarks, not operator settings).
`tests/unit/worker/test_configs.py` fails when a field is neither mapped nor listed as such, and
checks that every mapped setting reaches its field.
"""

from __future__ import annotations

from services.inference.adapter_cache.config import CacheConfig
from services.inference.engine.llm_engine import EngineConfig
from services.inference.settings import WorkerSettings

ENGINE_FROM_SETTINGS = {
    "block_size": "block_size",
    "max_num_seqs": "max_num_seqs",
    "max_num_batched_tokens": "max_num_batched_tokens",
    "kv_cache_bytes": "kv_cache_bytes",
    "kv_cache_memory_fraction": "kv_cache_memory_fraction",
    "dtype": "dtype",
    "device": "device",
    "attention_backend": "attention_backend",
    "lora_slots": "lora_slots",
    "lora_max_rank": "lora_max_rank",
    "lora_target_modules": "lora_target_modules",
    "lora_op": "lora_op",
    "lora_dtype": "lora_dtype",
    "quantization": "quantization",
}
ENGINE_DEFAULTS_ONLY = {"max_prefill_chunk", "enable_prefix_caching"}

CACHE_FROM_SETTINGS = {
    "host_bytes": "cache_host_bytes",
    "disk_bytes": "cache_disk_bytes",
    "disk_dir": "cache_dir",
    "download_timeout_s": "adapter_download_timeout_s",
    "latest_ttl_s": "adapter_latest_ttl_s",
    "import_schemes": "adapter_import_schemes",
}
CACHE_DEFAULTS_ONLY = {"download_attempts", "load_samples"}


def engine_config(settings: WorkerSettings) -> EngineConfig:
    return EngineConfig(**{field: getattr(settings, name) for field, name in ENGINE_FROM_SETTINGS.items()})


def cache_config(settings: WorkerSettings) -> CacheConfig:
    return CacheConfig(**{field: getattr(settings, name) for field, name in CACHE_FROM_SETTINGS.items()})
