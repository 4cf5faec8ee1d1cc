"""The compiled decode attention op (`attention/cpu_attention.cpp`): the same outputs as the SDPA path
it replaces on CPU, in every decode layout, dtype and window; no stray index read; SDPA where it
cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

from services.inference.engine.attention import torch_sdpa
from services.inference.engine.cpu_kernels import KernelUnavailable, library
from tests.kit.cpu import needs_a_compiler
from tests.unit.inference.test_engine_perf_attention import (
    DECODES_AFTER_PREFILL,
    DECODES_AROUND_CHUNK,
    DECODES_ONLY,
    DECODES_SPLIT_BY_LENGTH,
    run_step,
)

LAYOUTS = [DECODES_ONLY, DECODES_AFTER_PREFILL, DECODES_AROUND_CHUNK, DECODES_SPLIT_BY_LENGTH]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _with_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_sdpa, "_decode_op", False)  # as where the op cannot be built


@needs_a_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("seqs", LAYOUTS, ids=["only", "after", "around", "split"])
def test_compiled_decodes_match_sdpa(
    seqs: list[tuple[int, int, list[int]]],
    window: int | None,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    op = library().paged_decode

    def counted(*args: object) -> None:
        calls.append(1)
        op(*args)

    monkeypatch.setattr(torch_sdpa, "_decode_op", counted)
    compiled, expected, _ = run_step(seqs, window, dtype)
    assert calls, "decode rows must go through the compiled op"
    monkeypatch.undo()
    _with_sdpa(monkeypatch)
    sdpa, _, _ = run_step(seqs, window, dtype)
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(compiled, sdpa, rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(compiled[0].float(), torch.cat(expected), rtol=tolerance, atol=tolerance)


@needs_a_compiler
def test_a_sequence_of_many_blocks_with_more_query_heads_per_kv_head() -> None:
    """Long contexts over scattered blocks and 4 query heads per KV head, against a plain softmax."""
    torch.manual_seed(1)
    heads, kv_heads, dim, block, blocks = 8, 2, 16, 4, 64
    k_cache, v_cache = (torch.randn(blocks * block, kv_heads, dim) for _ in range(2))
    lens = torch.tensor([37, 1, 60], dtype=torch.long)
    table = torch.randperm(blocks)[:45].view(3, 15).to(torch.int32)
    q = torch.randn(3, heads, dim)
    out = torch.empty_like(q)
    library().paged_decode(out, q, k_cache, v_cache, table, lens, block, 0.25, 40)
    for b in range(3):
        positions = range(max(0, int(lens[b]) - 40), int(lens[b]))
        slots = torch.tensor([int(table[b, p // block]) * block + p % block for p in positions])
        for h in range(heads):
            keys, values = k_cache[slots, h // 4], v_cache[slots, h // 4]
            expected = (keys @ q[b, h] * 0.25).softmax(0) @ values
            torch.testing.assert_close(out[b, h], expected, rtol=1e-5, atol=1e-5)


@needs_a_compiler
def test_stray_lengths_and_block_ids_are_refused_not_read() -> None:
    op = library().paged_decode
    k_cache = v_cache = torch.zeros(8, 1, 4)  # two blocks of 4
    q, out = torch.ones(1, 1, 4), torch.zeros(1, 1, 4)
    with pytest.raises(RuntimeError, match="block 2 out of range"):
        op(out, q, k_cache, v_cache, torch.tensor([[2]], dtype=torch.int32), torch.tensor([3]), 4, 1.0, -1)
    with pytest.raises(RuntimeError, match="length 5 out of range"):
        op(out, q, k_cache, v_cache, torch.tensor([[1]], dtype=torch.int32), torch.tensor([5]), 4, 1.0, -1)
    with pytest.raises(RuntimeError, match="share a dtype"):
        op(
            out.double(),
            q.double(),
            k_cache,
            v_cache,
            torch.tensor([[1]], dtype=torch.int32),
            torch.tensor([3]),
            4,
            1.0,
            -1,
        )
    assert torch.equal(out, torch.zeros(1, 1, 4))


def test_without_the_op_decodes_use_sdpa_and_say_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unavailable() -> None:
        raise KernelUnavailable("the CPU kernels could not be built or loaded (no compiler)")

    monkeypatch.setattr(torch_sdpa, "_decode_op", None)  # as in a new process
    monkeypatch.setattr(torch_sdpa, "library", unavailable)
    with caplog.at_level(logging.WARNING):
        out, expected, _ = run_step(DECODES_ONLY, None, torch.float32)
    assert "decode attention uses SDPA over gathered blocks" in caplog.text
    torch.testing.assert_close(out[0], torch.cat(expected), rtol=1e-5, atol=1e-5)
