"""The compiled `cpu` op against the plain-torch op it replaces: the same sums in the same order, so the
same bits, in float32 and rounded once into bf16/fp16 outputs; over mixed ranks, base-model tokens,
prefill-length segments, rank cuts that are not whole chunks, and slots wider than their adapters."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from services.inference.engine import cpu_kernels
from services.inference.engine.lora import cpu_kernel
from services.inference.engine.lora.cpu_kernel import KernelUnavailable, kernel, lora_cpu
from services.inference.engine.lora.ops import SHORT_SEGMENT, lora_segment, plan_segments
from services.inference.engine.lora.pool import resolve_op
from services.inference.engine.lora.slots import EMPTY
from tests.kit.cpu import needs_a_compiler
from tests.unit.inference.lora.test_ops import as_the_pool_stores, reference, segments

CPU = torch.device("cpu")


@pytest.fixture
def compiled_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """`lora_cpu` may not hand the work to the plain op: comparisons with it would then prove nothing."""

    def fell_back(*args: object) -> None:
        raise AssertionError("lora_cpu fell back to the segment op")

    monkeypatch.setattr(cpu_kernel, "lora_segment", fell_back)


def weights(
    n_slots: int, r_max: int, d_in: int, d_out: int, ranks: list[int], seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n_slots, r_max, d_in, generator=g)
    b = torch.randn(n_slots, d_out, r_max, generator=g)
    for k, r in enumerate(ranks):  # past its rank a slot holds zeros, as the pool writes them
        a[k, r:] = 0
        b[k, :, r:] = 0
    return as_the_pool_stores(a, b)


@needs_a_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("r_max", "rank"), [(16, 16), (64, 16), (40, 24), (8, 3), (32, 32)])
@pytest.mark.usefixtures("compiled_only")
def test_the_kernel_adds_the_same_bits_as_the_plain_op(dtype: torch.dtype, r_max: int, rank: int) -> None:
    n_slots, d_in, d_out = 5, 48, 40
    ranks = [rank, max(1, rank // 2), rank, 0, rank]
    a, b = weights(n_slots, r_max, d_in, d_out, ranks, seed=r_max + rank)
    scaling = [2.0, 0.5, 1.0, 0.0, 0.25]
    seg_slots = [1, 0, EMPTY, 2, 0, 1, 4, 3, 0]  # a base-model segment; slot 3 holds nothing
    seg_indptr, token_slots = segments([3, 1, 4, 1, SHORT_SEGMENT + 7, 2, 1, 1, 2], seg_slots)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(seg_indptr[-1], d_in, generator=g).to(dtype)
    y = torch.randn(seg_indptr[-1], d_out, generator=g).to(dtype)
    plan = plan_segments(seg_indptr, seg_slots, scaling, ranks, CPU, layout="by-token")
    plain, compiled = y.clone(), y.clone()
    lora_segment(plain, x, a, b, plan, rank)
    lora_cpu(compiled, x, a, b, plan, rank)
    assert torch.equal(compiled, plain)
    expected = reference(y, x, a, b, scaling, ranks, token_slots)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(compiled.float(), expected.float(), rtol=tolerance, atol=tolerance)
    base_rows = slice(seg_indptr[2], seg_indptr[3])
    assert torch.equal(compiled[base_rows], y[base_rows])  # untouched, bit for bit


@needs_a_compiler
@pytest.mark.usefixtures("compiled_only")
def test_a_decode_step_where_every_token_has_an_adapter_matches_too() -> None:
    """The shape of a real step: 64 tokens over 42 slots of 64, d_in 96, rank 16 of 16."""
    ranks = [16] * 64
    a, b = weights(64, 16, 96, 32, ranks, seed=3)
    slots = sorted(torch.randint(0, 42, (64,), generator=torch.Generator().manual_seed(4)).tolist())
    plan = plan_segments(list(range(65)), slots, [0.5] * 64, ranks, CPU, layout="by-token")
    assert plan.bags is not None and plan.bags.all_rows
    x, y = torch.randn(64, 96), torch.randn(64, 32)
    plain, compiled = y.clone(), y.clone()
    lora_segment(plain, x, a, b, plan, 16)
    lora_cpu(compiled, x, a, b, plan, 16)
    assert torch.equal(compiled, plain)


@needs_a_compiler
def test_indices_out_of_range_are_refused_not_read() -> None:
    a, b = weights(2, 8, 16, 8, [8, 8], seed=5)
    y, x = torch.zeros(3, 8), torch.randn(3, 16)
    scale = torch.ones(1)
    op = kernel()
    with pytest.raises(RuntimeError, match="slot 2 out of range"):
        op(y, x, a.transpose(1, 2), b.transpose(1, 2), torch.tensor([0]), torch.tensor([2]), scale, 8)
    with pytest.raises(RuntimeError, match="row 3 out of range"):
        op(y, x, a.transpose(1, 2), b.transpose(1, 2), torch.tensor([3]), torch.tensor([0]), scale, 8)
    assert torch.equal(y, torch.zeros(3, 8))


def test_without_a_compiler_auto_falls_back_and_an_explicit_cpu_says_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OPENLORA_KERNEL_DIR", str(tmp_path / "kernels"))  # nothing built there yet
    monkeypatch.setenv("CXX", "no-such-compiler")
    monkeypatch.setattr(cpu_kernels, "_loaded", None)  # as in a new process (undone after the test)
    with pytest.raises(KernelUnavailable, match="no C\\+\\+ compiler"):
        kernel()
    with caplog.at_level(logging.WARNING):
        assert resolve_op("auto", CPU)[0] == "segment"
    assert "using the plain-torch segment op" in caplog.text
    with pytest.raises(ValueError, match="no C\\+\\+ compiler"):
        resolve_op("cpu", CPU)


def test_a_compiler_that_fails_leaves_no_half_built_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nor do killed builds, in time: a scratch folder older than an hour goes at the next build."""
    monkeypatch.setenv("OPENLORA_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "false")  # found on PATH, fails every compile
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    killed, running = tmp_path / "openlora_cpu_0.killed", tmp_path / "openlora_cpu_0.running"
    killed.mkdir()
    running.mkdir()
    two_hours_ago = time.time() - 7200
    os.utime(killed, (two_hours_ago, two_hours_ago))
    with pytest.raises(KernelUnavailable, match="could not be built"):
        kernel()
    assert [p.name for p in tmp_path.iterdir()] == [running.name]


@needs_a_compiler
def test_a_build_lands_whole_under_a_name_that_follows_the_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built in a folder of its own and renamed into place (in a process of its own: one process
    registers the op once); another CPU's flags give another name, so a shared cache never hands a CPU
    instructions it lacks."""
    name = cpu_kernels.build_name()
    monkeypatch.setattr(cpu_kernels, "_cpu_identity", lambda: b"flags : fpu sse2")
    assert cpu_kernels.build_name() != name
    monkeypatch.undo()
    script = (
        "import torch\n"
        "from services.inference.engine.lora.cpu_kernel import kernel\n"
        "y = torch.zeros(1, 2); a = torch.ones(1, 3, 1); b = torch.ones(1, 1, 2)\n"
        "kernel()(y, torch.ones(1, 3), a, b, torch.tensor([0]), torch.tensor([0]), torch.ones(1), 1)\n"
        "print(y.tolist())\n"
    )
    env = {**os.environ, "OPENLORA_KERNEL_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[[3.0, 3.0]]"
    assert [p.name for p in tmp_path.iterdir()] == [name]  # nothing else: the scratch folder was renamed
    library = tmp_path / name / f"{name}.so"
    assert library.is_file()
    library.write_bytes(b"not a shared library")  # a damaged cache entry is built anew, not trusted
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[[3.0, 3.0]]" and "building them again" in done.stderr
    assert library.stat().st_size > 1000


@needs_a_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.usefixtures("compiled_only")
def test_slots_in_the_model_dtype_sum_in_float32_as_float32_slots_do(dtype: torch.dtype) -> None:
    """`lora_dtype=model`: for weights that dtype holds exactly, the same bits as float32 slots."""
    ranks = [16, 8, 16]
    a, b = weights(3, 16, 40, 24, ranks, seed=9)
    a, b = a.to(dtype).float(), b.to(dtype).float()  # values the low-precision slots hold exactly
    seg_slots = [0, EMPTY, 2, 1]
    seg_indptr, _ = segments([2, 1, SHORT_SEGMENT + 3, 1], seg_slots)
    plan = plan_segments(seg_indptr, seg_slots, [1.0, 2.0, 0.5], ranks, CPU, layout="by-token")
    g = torch.Generator().manual_seed(10)
    x = torch.randn(seg_indptr[-1], 40, generator=g).to(dtype)
    y = torch.randn(seg_indptr[-1], 24, generator=g).to(dtype)
    in_float32_slots, in_low_slots = y.clone(), y.clone()
    lora_cpu(in_float32_slots, x, a, b, plan, 16)
    lora_cpu(in_low_slots, x, a.to(dtype), b.to(dtype), plan, 16)
    assert torch.equal(in_low_slots, in_float32_slots)
