"""Real PEFT LoRA adapters for tests, made with `peft` on a local model folder in a second or two."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = [*ATTENTION, "gate_proj", "up_proj", "down_proj"]


def make_peft_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    rank: int = 8,
    alpha: int = 16,
    targets: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Save a LoRA adapter for the model in base_dir with random (non-zero) A and B into out_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or ATTENTION, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:  # PEFT starts B at zero; random B makes the adapter change the output
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    peft_model.save_pretrained(str(out_dir))
    return out_dir


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tar_folder(folder: Path, members: dict[str, bytes] | None = None) -> bytes:
    """A tar of the folder's two PEFT files (or of the given name -> bytes members)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        items = members or {
            name: (folder / name).read_bytes()
            for name in ("adapter_config.json", "adapter_model.safetensors")
        }
        for name, data in items.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
