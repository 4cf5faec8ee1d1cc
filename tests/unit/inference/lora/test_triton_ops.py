"""The triton LoRA op equals the segment op: through triton's interpreter on CPU (a fresh process, since
TRITON_INTERPRET is read when kernels are defined) and compiled on CUDA when a GPU is present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.inference.engine.lora.ops import SHORT_SEGMENT, lora_segment, plan_segments
from services.inference.engine.lora.slots import EMPTY

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[4]


def check(device: str) -> None:
    """Random pool buffers and segments (one-token decodes, short runs, a long prefill, base rows)."""
    from services.inference.engine.lora.triton_ops import lora_bgmv

    g = torch.Generator().manual_seed(0)
    n_slots, r_max, d_in, d_out = 5, 16, 72, 80  # d_in/d_out not multiples of the kernels' blocks
    a = torch.randn(n_slots, r_max, d_in, generator=g)
    b = torch.randn(n_slots, d_out, r_max, generator=g)
    ranks = [8, 16, 4, 0, 12]
    for k, r in enumerate(ranks):
        a[k, r:] = 0
        b[k, :, r:] = 0
    scaling = [2.0, 0.5, 1.0, 0.0, 0.25]
    lengths = [1, 1, 3, 0, 2, SHORT_SEGMENT + 3, 1, 1, 4]
    seg_slots = [1, 0, EMPTY, 2, 4, 2, 3, 0, 1]
    seg_indptr = [0]
    for n in lengths:
        seg_indptr.append(seg_indptr[-1] + n)
    dev = torch.device(device)
    a, b = a.to(dev), b.to(dev)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(seg_indptr[-1], d_in, generator=g).to(dev, dtype)
        y = torch.randn(seg_indptr[-1], d_out, generator=g).to(dev, dtype)
        plan = plan_segments(seg_indptr, seg_slots, scaling, ranks, dev)
        expected = y.clone()
        lora_segment(expected, x, a, b, plan)
        lora_bgmv(y, x, a, b, plan)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(y.float(), expected.float(), rtol=tolerance, atol=tolerance)


def test_triton_kernels_equal_the_segment_op_in_the_interpreter() -> None:
    script = "from tests.unit.inference.lora.test_triton_ops import check; check('cpu'); print('ok')"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.cuda
def test_triton_kernels_equal_the_segment_op_on_cuda() -> None:
    check("cuda")
