"""Base models the store knows, and the shapes of the modules their adapters may target.

A base model is registered from its Hugging Face `config.json`; from it the store derives the input
and output width of each adaptable projection, so every upload can be checked against the model it
claims to fit before anything is stored.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument

# Architectures whose decoder layers use the separate q/k/v/o and gate/up/down projections.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite", "olmo2"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


@dataclass(frozen=True)
class ModuleShape:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class BaseModelSpec:
    name: str
    model_type: str
    num_layers: int
    modules: dict[str, ModuleShape]

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "name": self.name,
                "model_type": self.model_type,
                "num_layers": self.num_layers,
                "modules": {m.name: [m.in_features, m.out_features] for m in self.modules.values()},
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> BaseModelSpec:
        raw = json.loads(data)
        modules = {n: ModuleShape(n, int(i), int(o)) for n, (i, o) in raw["modules"].items()}
        return cls(raw["name"], raw["model_type"], int(raw["num_layers"]), modules)


def check_base_model_name(name: str, field: str = "base_model") -> str:
    if not name:
        raise InvalidArgument(field, "must not be empty")
    if not _NAME.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            field, f"{name[:80]!r} is not a valid model name (org/name of letters, digits, ._-)"
        )
    return name


def _positive_int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidArgument(f"config_json.{key}", f"must be a positive integer, got {value!r}")
    return value


def spec_from_config(name: str, config_json: str | bytes) -> BaseModelSpec:
    """Derive the adaptable module shapes from a model's config.json."""
    check_base_model_name(name, "name")
    try:
        config = json.loads(config_json)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nested too deep
        raise InvalidArgument("config_json", f"is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidArgument("config_json", "must be a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(
            "config_json.model_type",
            f"{model_type!r} is not supported (supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})",
        )
    hidden = _positive_int(config, "hidden_size")
    intermediate = _positive_int(config, "intermediate_size")
    heads = _positive_int(config, "num_attention_heads")
    layers = _positive_int(config, "num_hidden_layers")
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    if not isinstance(kv_heads, int) or not isinstance(head_dim, int) or kv_heads <= 0 or head_dim <= 0:
        raise InvalidArgument("config_json", "num_key_value_heads and head_dim must be positive integers")
    shapes = [
        ModuleShape("q_proj", hidden, heads * head_dim),
        ModuleShape("k_proj", hidden, kv_heads * head_dim),
        ModuleShape("v_proj", hidden, kv_heads * head_dim),
        ModuleShape("o_proj", heads * head_dim, hidden),
        ModuleShape("gate_proj", hidden, intermediate),
        ModuleShape("up_proj", hidden, intermediate),
        ModuleShape("down_proj", intermediate, hidden),
    ]
    return BaseModelSpec(name, str(model_type), layers, {s.name: s for s in shapes})
