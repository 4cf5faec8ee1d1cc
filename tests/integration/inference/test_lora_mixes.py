"""Adapter mixes against PEFT: LINEAR vs "cat", TIES vs "ties_svd", DARE vs PEFT's merge functions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.inference.engine.lora.mixes import Component, merge_deltas, mix
from services.inference.engine.lora.pool import LoRAPool, LoRAStep
from services.inference.engine.lora.weights import peft_pairs
from tests.kit.adapters import ATTENTION, make_peft_adapter

SPECS = {"p": (8, 16, ATTENTION), "q": (16, 8, [*ATTENTION, "down_proj"]), "s": (8, 32, ["q_proj", "v_proj"])}
WEIGHTS = {"p": 0.6, "q": 0.3, "s": 0.5}


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixes")
    return {
        name: make_peft_adapter(
            tiny_llama_dir, root / name, rank=r, alpha=alpha, targets=targets, seed=10 + i
        )
        for i, (name, (r, alpha, targets)) in enumerate(SPECS.items())
    }


def components(adapters: dict[str, Path]) -> list[Component]:
    return [
        Component(peft_pairs(load_file(adapters[n] / "adapter_model.safetensors")), r, alpha / r, WEIGHTS[n])
        for n, (r, alpha, _) in SPECS.items()
    ]


def peft_mixed(
    base_dir: Path, adapters: dict[str, Path], combination: str, **kwargs: object
) -> torch.nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    names = list(SPECS)
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), str(adapters[names[0]]), adapter_name=names[0]
    )
    for name in names[1:]:
        peft.load_adapter(str(adapters[name]), adapter_name=name)
    peft.add_weighted_adapter(
        names, [WEIGHTS[n] for n in names], "mixed", combination_type=combination, **kwargs
    )
    peft.set_adapter("mixed")
    return peft.eval()


def ours_model(
    base_dir: Path, mixed_pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int, scaling: float
) -> tuple[torch.nn.Module, LoRAPool, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    pool = LoRAPool(model, num_slots=1, r_max=rank, target_modules=tuple([*ATTENTION, "down_proj"]))
    slot = pool.load("mix", mixed_pairs, rank, scaling)
    return model, pool, slot


def greedy(forward: object, ids: torch.Tensor, steps: int) -> list[int]:
    """Greedy tokens by full forward passes (no cache), so both models run the very same computation."""
    out = ids
    for _ in range(steps):
        with torch.no_grad():
            logits = forward(out)  # type: ignore[operator]
        out = torch.cat([out, logits[:, -1:].argmax(-1)], dim=1)
    return out[0, ids.shape[1] :].tolist()


def test_linear_mix_equals_peft_cat(tiny_llama_dir: Path, adapters: dict[str, Path]) -> None:
    mixed = mix(components(adapters), "LINEAR")
    assert mixed.rank == 32 and mixed.scaling == 1.0  # q_proj carries all three: 8 + 16 + 8
    model, pool, slot = ours_model(tiny_llama_dir, mixed.pairs, mixed.rank, mixed.scaling)
    reference = peft_mixed(tiny_llama_dir, adapters, "cat")
    ids = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(0))

    def forward(x: torch.Tensor) -> torch.Tensor:
        with pool.step(LoRAStep([0, x.shape[1]], [slot])):
            return model(input_ids=x).logits  # type: ignore[no-any-return]

    torch.testing.assert_close(forward(ids), reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    assert greedy(forward, ids, 12) == greedy(lambda x: reference(input_ids=x).logits, ids, 12)


def test_ties_svd_within_tolerance_of_peft(tiny_llama_dir: Path, adapters: dict[str, Path]) -> None:
    mixed = mix(components(adapters), "TIES", density=0.5, rank=8)
    model, pool, slot = ours_model(tiny_llama_dir, mixed.pairs, mixed.rank, mixed.scaling)
    reference = peft_mixed(tiny_llama_dir, adapters, "ties_svd", density=0.5, svd_rank=8)
    ids = torch.randint(3, 500, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pool.step(LoRAStep([0, 16], [slot])):
        ours = model(input_ids=ids).logits
    expected = reference(input_ids=ids).logits
    # Same merge, same rank; the SVDs differ only by float rounding (and ours skips full_matrices).
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["DARE_LINEAR", "DARE_TIES", "TIES"])
def test_module_merges_equal_peft_merge_functions(strategy: str) -> None:
    from peft.utils import merge_utils

    g = torch.Generator().manual_seed(3)
    deltas = [torch.randn(12, 20, generator=g) for _ in range(3)]
    weights = [0.5, 1.0, 0.25]
    ours = merge_deltas(deltas, weights, strategy, 0.4, torch.Generator().manual_seed(7))  # type: ignore[arg-type]
    torch.manual_seed(7)  # PEFT draws DARE's drop from the global generator: the same stream
    peft_fn = {
        "DARE_LINEAR": merge_utils.dare_linear,
        "DARE_TIES": merge_utils.dare_ties,
        "TIES": merge_utils.ties,
    }
    expected = peft_fn[strategy](deltas, torch.tensor(weights), 0.4)
    torch.testing.assert_close(ours, expected)


def test_dare_mixes_are_deterministic_under_a_seed(adapters: dict[str, Path]) -> None:
    first = mix(components(adapters), "DARE_TIES", density=0.5, rank=8, seed=42)
    again = mix(components(adapters), "DARE_TIES", density=0.5, rank=8, seed=42)
    other = mix(components(adapters), "DARE_TIES", density=0.5, rank=8, seed=43)
    for path, (a, b) in first.pairs.items():
        assert torch.equal(a, again.pairs[path][0]) and torch.equal(b, again.pairs[path][1])
    assert any(
        not torch.equal(b @ a, other.pairs[p][1] @ other.pairs[p][0]) for p, (a, b) in first.pairs.items()
    )


def test_bad_mixes_are_refused(adapters: dict[str, Path]) -> None:
    with pytest.raises(ValueError, match="at least one"):
        mix([], "LINEAR")
    with pytest.raises(ValueError, match="density"):
        mix(components(adapters), "TIES", density=0.0)
