"""A parsed adapter in host RAM, and how it is built from the store's canonical files."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from services.inference.adapter_cache.errors import AdapterCorrupt
from services.inference.adapter_cache.key import AdapterKey
from services.inference.engine.lora.weights import peft_pairs

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The store writes canonical names only: base_model.model.<module path>.lora_<A|B>.weight
_CANONICAL = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True, eq=False)  # identity equality: comparing tensors element-wise is not wanted
class LoadedAdapter:
    id: str
    version: str
    digest: str  # sha256 of the canonical adapter_model.safetensors
    rank: int
    alpha: float  # the delta is scaled by alpha / rank
    target_modules: tuple[str, ...]  # e.g. ("down_proj", "q_proj")
    # canonical module path (e.g. "model.layers.0.self_attn.q_proj") ->
    #   (lora_A [rank, d_in], lora_B [d_out, rank]), float32, CPU (pinned when CUDA is available)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    size_bytes: int  # host bytes of every A and B together (what the host tier budgets)
    # For a derived adapter (a mix): (component id, version, share), shares summing to 1.
    mix_of: tuple[tuple[str, str, float], ...] = ()

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def components(self) -> tuple[tuple[str, str, float], ...]:
        """Whom a token produced through this adapter credits, and by what share."""
        return self.mix_of or ((self.id, self.version, 1.0),)

    @property
    def key(self) -> str:
        """Its name in the tiers and the engine (`AdapterKey.name`)."""
        return AdapterKey(self.id, self.version).name


def parse_adapter(
    adapter_id: str, version: str, digest: str, folder: Path, *, pin_memory: bool | None = None
) -> LoadedAdapter:
    """Read and check `folder`'s two files (blocking: call off the event loop).

    The weights' sha256 must equal `digest`; anything that does not parse as the store's canonical
    form is refused as corrupt too, since the store validated the adapter before storing it.
    """
    what = AdapterKey(adapter_id, version).name
    try:
        config_raw = (folder / CONFIG_FILE).read_bytes()
        data = (folder / WEIGHTS_FILE).read_bytes()
    except OSError as exc:
        raise AdapterCorrupt(f"adapter {what}: cannot read its files: {exc.strerror}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise AdapterCorrupt(f"adapter {what}: weights hash to {actual[:12]}…, expected {digest[:12]}…")
    rank, alpha = _rank_alpha(config_raw, what)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    weights = _pairs(_load_tensors(data, what), rank, what, pin_memory)
    del data
    size = sum(a.nbytes + b.nbytes for a, b in weights.values())
    targets = tuple(sorted({path.rsplit(".", 1)[-1] for path in weights}))
    return LoadedAdapter(adapter_id, version, digest, rank, alpha, targets, weights, size)


def _rank_alpha(config_raw: bytes, what: str) -> tuple[int, float]:
    try:
        config: Any = json.loads(config_raw)
        rank, alpha = int(config["r"]), float(config["lora_alpha"])
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        raise AdapterCorrupt(f"adapter {what}: adapter_config.json lacks a valid r or lora_alpha") from None
    if rank <= 0 or alpha <= 0:
        raise AdapterCorrupt(f"adapter {what}: r={rank} and lora_alpha={alpha} must be positive")
    return rank, alpha


def _load_tensors(data: bytes, what: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError) as exc:
        raise AdapterCorrupt(f"adapter {what}: unreadable safetensors: {exc}") from None


def _pairs(
    tensors: dict[str, torch.Tensor], rank: int, what: str, pin_memory: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    unexpected = [name for name in tensors if not _CANONICAL.match(name)]
    if unexpected:
        raise AdapterCorrupt(f"adapter {what}: unexpected tensor {unexpected[0]!r}")
    try:
        pairs = peft_pairs(tensors)
    except ValueError as exc:
        raise AdapterCorrupt(f"adapter {what}: {exc}") from None
    if not pairs:
        raise AdapterCorrupt(f"adapter {what}: holds no LoRA weights")
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, (raw_a, raw_b) in sorted(pairs.items()):
        lora_a, lora_b = _host_tensor(raw_a, pin_memory), _host_tensor(raw_b, pin_memory)
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != rank or lora_b.shape[1] != rank:
            raise AdapterCorrupt(
                f"adapter {what}: {path} has A {list(lora_a.shape)} and B {list(lora_b.shape)}, "
                f"not [{rank}, d_in] and [d_out, {rank}]"
            )
        weights[path] = (lora_a, lora_b)
    return weights


def _host_tensor(tensor: torch.Tensor, pin_memory: bool) -> torch.Tensor:
    # float32 on the host whatever was uploaded: the LoRA delta is computed in fp32 (as PEFT does);
    # pinned pages let the device tier copy_ into its slots asynchronously.
    host = tensor.to(dtype=torch.float32).contiguous()
    return host.pin_memory() if pin_memory else host
