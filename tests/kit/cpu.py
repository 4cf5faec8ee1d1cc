"""What the test machine's CPU computes fast: slow tests size their work by it, not by a guess.

The project's machines change between sessions: one had AVX-512 BF16, where bf16 matmuls ran faster
than fp32; the next had AVX2 only, where torch emulates bf16 at about an eighth of fp32's speed and
the 8k-prompt test took 165 s of its 300 s limit in bf16 on a quiet machine.
"""

from __future__ import annotations

import os
import shutil
from typing import Literal

import pytest
import torch

from services.inference.engine.dtypes import resolve_dtype


def fast_dtype() -> Literal["bfloat16", "float32"]:
    """bfloat16 where the CPU has bf16 instructions (or on CUDA), else float32: what `dtype=auto` picks."""
    picked = resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu")
    assert picked != "float16"
    return picked


def cpu_lora_op() -> Literal["cpu", "segment"]:
    """The LoRA op `auto` must pick on CPU here: the compiled one wherever a C++ compiler is found (a
    failed build there is a failure, not a fallback), the plain-torch one where none is."""
    return "cpu" if shutil.which(os.environ.get("CXX", "c++")) else "segment"


needs_a_compiler = pytest.mark.skipif(cpu_lora_op() == "segment", reason="needs a C++ compiler")
