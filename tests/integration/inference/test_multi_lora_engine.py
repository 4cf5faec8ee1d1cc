"""Multi-LoRA through the engine: concurrent requests over 8 adapters (ranks 8 and 16, some on the MLP)
and the base model, with fewer device slots than adapters, give PEFT's greedy tokens per request."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.common.errors import InvalidArgument
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.lora.weights import peft_pairs
from services.inference.engine.sequence import SamplingParams
from tests.integration.inference.hf_reference import peft_greedy, peft_with_adapters
from tests.kit.adapters import ALL_LINEAR, ATTENTION, make_peft_adapter
from tests.kit.cpu import needs_a_compiler


class Adapter:
    def __init__(self, folder: Path, rank: int, alpha: int) -> None:
        self.weights = peft_pairs(load_file(folder / "adapter_model.safetensors"))
        self.rank, self.scaling = rank, alpha / rank


SPECS = [  # (rank, alpha, targets): 8 adapters, mixed ranks, some on the MLP
    (8, 16, ATTENTION),
    (16, 16, ALL_LINEAR),
    (8, 8, ["q_proj", "v_proj"]),
    (16, 32, ["down_proj", "up_proj"]),
    (8, 16, ALL_LINEAR),
    (16, 8, ATTENTION),
    (8, 32, ["gate_proj", "o_proj"]),
    (16, 16, ["q_proj", "k_proj"]),
]


@pytest.fixture(scope="module")
def adapters(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, int, int]]:
    root = tmp_path_factory.mktemp("engine-lora")
    return {
        f"a{i}": (
            make_peft_adapter(tiny_llama_dir, root / f"a{i}", rank=r, alpha=al, targets=t, seed=100 + i),
            r,
            al,
        )
        for i, (r, al, t) in enumerate(SPECS)
    }


def peft_reference(
    base_dir: Path,
    adapters: dict[str, tuple[Path, int, int]],
    jobs: list[tuple[list[int], str | None]],
    max_new: int,
) -> list[list[int]]:
    peft = peft_with_adapters(base_dir, {name: folder for name, (folder, _, _) in adapters.items()})
    return peft_greedy(peft, jobs, max_new)  # each request alone, as the reference


def test_concurrent_adapters_match_peft_with_slot_eviction(
    tiny_llama_dir: Path, adapters: dict[str, tuple[Path, int, int]]
) -> None:
    rng = random.Random(7)
    names: list[str | None] = [*adapters, None, None]  # two base-model requests in every ten
    jobs = [
        ([rng.randrange(3, 500) for _ in range(rng.randint(4, 40))], names[i % len(names)]) for i in range(20)
    ]
    max_new = 12
    expected = peft_reference(tiny_llama_dir, adapters, jobs, max_new)

    config = EngineConfig(
        lora_slots=3, lora_max_rank=16, kv_cache_bytes=8 << 20, max_num_seqs=8, max_num_batched_tokens=96
    )
    engine = LLMEngine.from_pretrained(tiny_llama_dir, config)
    for key, (folder, rank, alpha) in adapters.items():
        engine.add_adapter(key, Adapter(folder, rank, alpha))
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    seqs = []
    for i, (prompt, adapter_name) in enumerate(jobs):  # staggered arrivals: a few steps between requests
        seqs.append(engine.add_request(f"r{i}", prompt, params, adapter_key=adapter_name))
        for _ in range(i % 3):
            engine.step()
    while any(not s.is_finished for s in seqs):
        engine.step()
    got = [list(s.output_token_ids) for s in seqs]
    assert got == expected
    assert engine.residency is not None and engine.residency.pool.table.evictions > 0  # slots were reused
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_unknown_adapters_and_base_only_engines_refuse(tiny_llama_dir: Path) -> None:
    engine = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(lora_slots=2, kv_cache_bytes=1 << 20))
    with pytest.raises(InvalidArgument, match="not registered"):
        engine.add_request("x", [5, 6, 7], adapter_key="nope")
    base_only = LLMEngine.from_pretrained(tiny_llama_dir, EngineConfig(kv_cache_bytes=1 << 20))
    with pytest.raises(InvalidArgument, match="base model only"):
        base_only.add_request("y", [5, 6, 7], adapter_key="a0")


def test_requests_waiting_for_a_slot_start_once_the_batch_before_them_finished(
    tiny_llama_dir: Path, adapters: dict[str, tuple[Path, int, int]]
) -> None:
    # Two slots, three adapters, all arriving together: the third adapter's requests can only start
    # after the others finished; the finished requests' slots must be released although nothing runs.
    engine = LLMEngine.from_pretrained(
        tiny_llama_dir, EngineConfig(kv_cache_bytes=1 << 22, lora_slots=2, lora_max_rank=16)
    )
    for name in ("a0", "a1", "a2"):
        folder, rank, alpha = adapters[name]
        engine.add_adapter(name, Adapter(folder, rank, alpha))
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    seqs = [engine.add_request(f"r{i}", [9 + i, 8, 7], sampling, adapter_key=f"a{i % 3}") for i in range(6)]
    for _ in range(200):
        if not engine.has_unfinished():
            break
        engine.step()
    assert all(len(s.output_token_ids) == 6 for s in seqs), "requests were left waiting for a slot"


@needs_a_compiler
def test_slots_in_the_model_dtype_hold_half_the_bytes_and_lose_nothing_of_bf16_adapters(
    tiny_llama_dir: Path, adapters: dict[str, tuple[Path, int, int]]
) -> None:
    """`lora_dtype=model` on a bf16 model: slots of half the bytes, and for adapters whose weights are
    already bf16 the compiled op sums the same values in the same order as with float32 slots, so the
    tokens are the same ones."""
    rng = random.Random(11)
    names = list(adapters)
    jobs = [
        ([rng.randrange(3, 500) for _ in range(rng.randint(4, 30))], names[i % len(names)]) for i in range(8)
    ]
    outputs = {}
    slot_bytes = {}
    for lora_dtype in ("float32", "model"):
        config = EngineConfig(
            dtype="bfloat16", lora_slots=8, lora_max_rank=16, kv_cache_bytes=8 << 20, lora_dtype=lora_dtype
        )
        engine = LLMEngine.from_pretrained(tiny_llama_dir, config)
        assert engine.residency is not None and engine.residency.pool.op_name == "cpu"
        for key, (folder, rank, alpha) in adapters.items():
            adapter = Adapter(folder, rank, alpha)
            adapter.weights = {  # weights a bf16 training run would have saved
                name: (a.bfloat16().float(), b.bfloat16().float()) for name, (a, b) in adapter.weights.items()
            }
            engine.add_adapter(key, adapter)
        params = SamplingParams(max_new_tokens=10, ignore_eos=True)
        seqs = [engine.add_request(f"r{i}", p, params, adapter_key=n) for i, (p, n) in enumerate(jobs)]
        while any(not s.is_finished for s in seqs):
            engine.step()
        outputs[lora_dtype] = [list(s.output_token_ids) for s in seqs]
        layers = engine.residency.pool.layers.values()
        slot_bytes[lora_dtype] = sum(m.lora_a.nbytes + m.lora_b.nbytes for m in layers)
        assert {m.lora_a.dtype for m in layers} == {
            torch.float32 if lora_dtype == "float32" else torch.bfloat16
        }
    assert outputs["model"] == outputs["float32"]
    assert slot_bytes["model"] * 2 == slot_bytes["float32"]


def test_no_slot_stays_pinned_once_nothing_runs(
    tiny_llama_dir: Path, adapters: dict[str, tuple[Path, int, int]]
) -> None:
    # Found by the soak: the last requests' pins waited for a step that never came (the engine steps
    # only while it has work), so /metrics showed a pinned slot on an idle worker.
    engine = LLMEngine.from_pretrained(
        tiny_llama_dir, EngineConfig(kv_cache_bytes=1 << 22, lora_slots=2, lora_max_rank=16)
    )
    for name in ("a0", "a1"):
        folder, rank, alpha = adapters[name]
        engine.add_adapter(name, Adapter(folder, rank, alpha))
    table = engine.residency.pool.table  # type: ignore[union-attr]
    sampling = SamplingParams(max_new_tokens=3, ignore_eos=True)
    engine.add_request("done", [9, 8, 7], sampling, adapter_key="a0")
    while engine.has_unfinished():
        engine.step()
    assert not table.is_pinned("a0")
    engine.add_request("cut", [9, 8, 7], sampling, adapter_key="a1")
    engine.step()
    assert table.is_pinned("a1")
    engine.abort("cut")
    assert not table.is_pinned("a1")
