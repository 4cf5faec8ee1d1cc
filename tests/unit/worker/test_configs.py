"""Every worker setting meant for the engine or the adapter cache reaches its config field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from services.inference.adapter_cache.config import CacheConfig
from services.inference.configs import (
    CACHE_DEFAULTS_ONLY,
    CACHE_FROM_SETTINGS,
    ENGINE_DEFAULTS_ONLY,
    ENGINE_FROM_SETTINGS,
    cache_config,
    engine_config,
)
from services.inference.engine.llm_engine import EngineConfig
from services.inference.settings import WorkerSettings

# A value differing from the default for each setting the configs read (valid for the settings).
NON_DEFAULT: dict[str, Any] = {
    "block_size": 32,
    "max_num_seqs": 7,
    "max_num_batched_tokens": 333,
    "kv_cache_bytes": 12345678,
    "kv_cache_memory_fraction": 0.35,
    "dtype": "bfloat16",
    "device": "meta",
    "attention_backend": "flash_attn",
    "lora_slots": 5,
    "lora_max_rank": 24,
    "lora_target_modules": ("q_proj", "o_proj"),
    "lora_op": "segment",
    "lora_dtype": "model",
    "quantization": "int8",
    "cache_host_bytes": 111 * 1024 * 1024,
    "cache_disk_bytes": 222 * 1024 * 1024,
    "cache_dir": Path("/tmp/openlora-config-test"),
    "adapter_download_timeout_s": 9.5,
    "adapter_latest_ttl_s": 1.25,
    "adapter_import_schemes": ("hf", "s3"),
}


@pytest.mark.parametrize(
    ("config_class", "mapping", "defaults_only"),
    [
        (EngineConfig, ENGINE_FROM_SETTINGS, ENGINE_DEFAULTS_ONLY),
        (CacheConfig, CACHE_FROM_SETTINGS, CACHE_DEFAULTS_ONLY),
    ],
)
def test_every_config_field_is_mapped_or_kept_at_its_default_on_purpose(
    config_class: type, mapping: dict[str, str], defaults_only: set[str]
) -> None:
    fields = {f.name for f in dataclasses.fields(config_class)}
    assert fields == set(mapping) | defaults_only, "a config field is neither mapped nor listed"
    assert not set(mapping) & defaults_only
    assert set(mapping.values()) <= set(WorkerSettings.model_fields), "a mapping names no setting"


def test_every_mapped_setting_reaches_its_field() -> None:
    assert set(NON_DEFAULT) == set(ENGINE_FROM_SETTINGS.values()) | set(CACHE_FROM_SETTINGS.values())
    settings = WorkerSettings.model_construct(**{**WorkerSettings().model_dump(), **NON_DEFAULT})
    for name, value in NON_DEFAULT.items():
        assert getattr(WorkerSettings(), name) != value, f"{name}: the test value is the default"
    engine = engine_config(settings)
    for field, name in ENGINE_FROM_SETTINGS.items():
        assert getattr(engine, field) == NON_DEFAULT[name], field
    cache = cache_config(settings)
    for field, name in CACHE_FROM_SETTINGS.items():
        assert getattr(cache, field) == NON_DEFAULT[name], field
