"""Multi-LoRA on the real SmolLM2-135M: concurrent requests over 8 adapters (ranks 8 and 16, some on the
MLP) and the base model, through fewer device slots than adapters, give PEFT's greedy tokens per request."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from safetensors.torch import load_file

from services.cluster.synthetic_adapters import SMOLLM2_135M_CONFIG, write_adapter
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.lora.weights import peft_pairs
from services.inference.engine.sequence import SamplingParams
from tests.integration.inference.hf_reference import peft_greedy, peft_with_adapters
from tests.kit.adapters import ALL_LINEAR, ATTENTION

pytestmark = pytest.mark.slow

SPECS = [  # (rank, targets); alpha is 2 * rank (write_adapter's convention)
    (8, ATTENTION),
    (16, ALL_LINEAR),
    (8, ["q_proj", "v_proj"]),
    (16, ["down_proj", "up_proj"]),
    (8, ALL_LINEAR),
    (16, ATTENTION),
    (8, ["gate_proj", "o_proj"]),
    (16, ["q_proj", "k_proj"]),
]
MAX_NEW = 8


class Adapter:
    def __init__(self, folder: Path, rank: int) -> None:
        self.weights = peft_pairs(load_file(folder / "adapter_model.safetensors"))
        self.rank, self.scaling = rank, 2.0


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, int]]:
    root = tmp_path_factory.mktemp("smollm2-lora")
    return {
        f"a{i}": (write_adapter(root / f"a{i}", SMOLLM2_135M_CONFIG, rank=r, targets=t, seed=300 + i), r)
        for i, (r, t) in enumerate(SPECS)
    }


def peft_reference(
    base_dir: Path, adapters: dict[str, tuple[Path, int]], jobs: list[tuple[list[int], str | None]]
) -> list[list[int]]:
    peft = peft_with_adapters(base_dir, {name: folder for name, (folder, _) in adapters.items()})
    return peft_greedy(peft, jobs, MAX_NEW)  # each request alone: the reference


def test_smollm2_concurrent_adapters_match_peft(
    smollm2_dir: Path, adapters: dict[str, tuple[Path, int]]
) -> None:
    rng = random.Random(11)
    names: list[str | None] = [*adapters, None, None]
    jobs = [([rng.randrange(100, 40000) for _ in range(rng.randint(5, 60))], name) for name in names]
    expected = peft_reference(smollm2_dir, adapters, jobs)

    config = EngineConfig(
        dtype="float32",
        lora_slots=3,
        lora_max_rank=16,
        kv_cache_bytes=64 << 20,
        max_num_seqs=6,
        max_num_batched_tokens=128,
    )
    engine = LLMEngine.from_pretrained(smollm2_dir, config)
    for key, (folder, rank) in adapters.items():
        engine.add_adapter(key, Adapter(folder, rank))
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    seqs = []
    for i, (prompt, name) in enumerate(jobs):  # staggered arrivals
        seqs.append(engine.add_request(f"r{i}", prompt, params, adapter_key=name))
        for _ in range(i % 3):
            engine.step()
    while any(not s.is_finished for s in seqs):
        engine.step()
    assert [list(s.output_token_ids) for s in seqs] == expected
    assert engine.residency is not None and engine.residency.pool.table.evictions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
