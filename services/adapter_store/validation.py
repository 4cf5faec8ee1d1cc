"""Checks a PEFT LoRA adapter against the base model it claims to fit, before anything is stored.

Each refusal is an InvalidArgument naming the file or config key at fault. What is checked: the
config (LoRA, rank and alpha present and sane, features we cannot serve refused), every tensor name
(lora_A/lora_B of a known module in an existing layer), shapes against the rank and the base model's
widths, pairs complete, dtypes allowed, and no NaN or Inf anywhere.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.adapter_store.base_models import BaseModelSpec
from services.adapter_store.safetensors_file import FIELD, SafetensorsHeader, read_header, read_tensor_bytes
from services.common.errors import InvalidArgument

CONFIG = "adapter_config.json"
# base_model.model.<path>.layers.<n>.<block>.<module>.lora_<A|B>[.<adapter name>].weight
_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<path>(?:[a-z_]+\.)*layers\.(?P<layer>\d+)\.(?:[a-z_]+\.)*?(?P<module>[a-z_]+))"
    r"\.lora_(?P<part>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$"
)


@dataclass(frozen=True)
class ValidatedAdapter:
    rank: int
    alpha: float
    target_modules: list[str]
    header: SafetensorsHeader
    renames: dict[str, str]  # uploaded tensor name -> canonical name
    config: dict[str, Any]  # canonical adapter_config.json


def parse_config(raw: bytes, max_rank: int) -> tuple[int, float, dict[str, Any]]:
    try:
        config = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        raise InvalidArgument(CONFIG, "is not valid JSON (or is nested too deep)") from None
    if not isinstance(config, dict):
        raise InvalidArgument(CONFIG, "must be a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidArgument(f"{CONFIG}.peft_type", f"{config.get('peft_type')!r} is not LORA")
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise InvalidArgument(f"{CONFIG}.r", f"must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise InvalidArgument(f"{CONFIG}.r", f"rank {rank} exceeds this store's limit of {max_rank}")
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not 0 < alpha < 1e6:
        raise InvalidArgument(f"{CONFIG}.lora_alpha", f"must be a positive number, got {alpha!r}")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias": config.get("bias", "none") not in (None, "none"),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
    }
    for key, present in unsupported.items():
        if present:
            raise InvalidArgument(
                f"{CONFIG}.{key}", f"{key}={config.get(key)!r} is not supported for serving"
            )
    return rank, float(alpha), config


def validate(
    config_raw: bytes, weights: Path, base: BaseModelSpec, *, max_rank: int, allowed_dtypes: Collection[str]
) -> ValidatedAdapter:
    rank, alpha, declared = parse_config(config_raw, max_rank)
    header = read_header(weights)
    if not header.tensors:
        raise InvalidArgument(FIELD, "holds no tensors")
    renames: dict[str, str] = {}
    parts: dict[str, set[str]] = {}
    for name, entry in header.tensors.items():
        match = _TENSOR.match(name)
        if match is None:
            raise InvalidArgument(FIELD, f"tensor {name!r} is not a lora_A/lora_B weight of a layer module")
        module, layer, part = match["module"], int(match["layer"]), match["part"]
        shape = base.modules.get(module)
        if shape is None:
            raise InvalidArgument(
                FIELD,
                f"tensor {name!r} targets {module!r}, which {base.name} does not have "
                f"(adaptable: {', '.join(sorted(base.modules))})",
            )
        if layer >= base.num_layers:
            raise InvalidArgument(
                FIELD, f"tensor {name!r} is for layer {layer}; {base.name} has {base.num_layers}"
            )
        if entry.dtype not in allowed_dtypes:
            raise InvalidArgument(
                FIELD, f"tensor {name!r} has dtype {entry.dtype}; allowed: {', '.join(allowed_dtypes)}"
            )
        want = (rank, shape.in_features) if part == "A" else (shape.out_features, rank)
        if entry.shape != want:
            raise InvalidArgument(
                FIELD,
                f"tensor {name!r} has shape {list(entry.shape)}; "
                f"rank {rank} on {base.name} needs {list(want)}",
            )
        canonical = f"base_model.model.{match['path']}.lora_{part}.weight"
        if canonical in renames.values():
            raise InvalidArgument(FIELD, f"tensor {name!r} duplicates {canonical!r}")
        renames[name] = canonical
        parts.setdefault(match["path"], set()).add(part)
    for path, found in parts.items():
        if found != {"A", "B"}:
            missing = ({"A", "B"} - found).pop()
            raise InvalidArgument(FIELD, f"{path} has no lora_{missing} weight to pair with")
    _check_finite(weights, header)
    _check_declared_targets(declared.get("target_modules"), sorted(parts))
    targets = sorted({p.rsplit(".", 1)[-1] for p in parts})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "base_model_name_or_path": base.name,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    return ValidatedAdapter(rank, alpha, targets, header, renames, config)


def _check_declared_targets(declared: Any, paths: list[str]) -> None:
    """The config's `target_modules` must cover every module the weights adapt, as PEFT reads it: a
    list of module names, or a regular expression matched against the whole module path (or
    `all-linear`). An adapter whose config and weights disagree is a broken export."""
    field = f"{CONFIG}.target_modules"
    if declared is None or declared == "all-linear":
        return
    if isinstance(declared, str):
        try:
            pattern = re.compile(declared)
        except re.error as exc:
            raise InvalidArgument(field, f"is not a valid regular expression: {exc}") from None
        outside = [p for p in paths if pattern.fullmatch(p) is None]
    elif isinstance(declared, list) and all(isinstance(m, str) for m in declared):
        outside = [p for p in paths if p.rsplit(".", 1)[-1] not in declared]
    else:
        raise InvalidArgument(field, "must be a list of module names or a regular expression")
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise InvalidArgument(field, f"does not cover modules the weights adapt: {shown}")


def _check_finite(weights: Path, header: SafetensorsHeader) -> None:
    import torch

    dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
    with open(weights, "rb") as src:
        for entry in header.tensors.values():
            if entry.dtype not in dtypes or entry.nbytes == 0:
                continue
            data = bytearray(read_tensor_bytes(src, header, entry))
            tensor = torch.frombuffer(data, dtype=dtypes[entry.dtype])
            if not bool(torch.isfinite(tensor).all()):
                raise InvalidArgument(FIELD, f"tensor {entry.name!r} contains NaN or Inf")
