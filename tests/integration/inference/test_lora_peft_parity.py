"""The slot pool's wrapped layers give PEFT's logits for a batch mixing adapters and the base model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.inference.engine.lora.ops import SegmentPlan, bags_fit
from services.inference.engine.lora.pool import LoRAPool, LoRAStep
from services.inference.engine.lora.slots import EMPTY
from services.inference.engine.lora.weights import peft_pairs
from tests.kit.adapters import ALL_LINEAR, ATTENTION, make_peft_adapter

ADAPTERS = {  # name -> (rank, alpha, targets): mixed ranks, some on the MLP too
    "attn8": (8, 16, ATTENTION),
    "all16": (16, 8, ALL_LINEAR),
    "mlp8": (8, 32, ["gate_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-parity")
    return {
        name: make_peft_adapter(tiny_llama_dir, root / name, rank=r, alpha=alpha, targets=targets, seed=i + 1)
        for i, (name, (r, alpha, targets)) in enumerate(ADAPTERS.items())
    }


def peft_logits(
    base_dir: Path, adapters: dict[str, Path], ids: torch.Tensor, names: list[str]
) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    first, *rest = adapters
    peft = PeftModel.from_pretrained(model, str(adapters[first]), adapter_name=first)
    for name in rest:
        peft.load_adapter(str(adapters[name]), adapter_name=name)
    peft.eval()
    with torch.no_grad():
        logits: torch.Tensor = peft(input_ids=ids, adapter_names=names).logits
    return logits


def pool_loader(pool: LoRAPool, adapters: dict[str, Path]) -> Callable[[str], int]:
    def load(name: str) -> int:
        rank, alpha, _ = ADAPTERS[name]
        return pool.load(
            name, peft_pairs(load_file(adapters[name] / "adapter_model.safetensors")), rank, alpha / rank
        )

    return load


def ours(model: torch.nn.Module, pool: LoRAPool, ids: torch.Tensor, slots: list[int]) -> torch.Tensor:
    """Our logits for a [rows, length] batch: the wrapped layers see rows*length tokens, one segment a row."""
    rows, length = ids.shape
    step = LoRAStep(seg_indptr=[i * length for i in range(rows + 1)], seg_slots=slots)
    with torch.no_grad(), pool.step(step):
        logits: torch.Tensor = model(input_ids=ids).logits
    return logits


def test_mixed_batch_matches_peft(tiny_llama_dir: Path, adapters: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 500, (4, 12), generator=torch.Generator().manual_seed(0))
    names = ["attn8", "__base__", "all16", "mlp8"]
    expected = peft_logits(tiny_llama_dir, adapters, ids, names)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pool = LoRAPool(model, num_slots=3, r_max=16)
    # On CPU the rows (12 tokens, short segments) are read by token, in the slot buffers as stored.
    assert all(bags_fit(layer.lora_a, layer.lora_b) for layer in pool.layers.values())
    load = pool_loader(pool, adapters)
    slots = [load("attn8"), EMPTY, load("all16"), load("mlp8")]
    got = ours(model, pool, ids, slots)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # the adapters really change the output (otherwise this test would prove nothing)
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_slots_wider_than_the_adapters_cost_only_what_the_adapters_hold(
    tiny_llama_dir: Path, adapters: dict[str, Path]
) -> None:
    """Slots of rank 64 (the worker's default) serving rank-8 and rank-16 adapters: each module is
    given the most rank the step's adapters hold there, a module none of them touches is skipped, and
    the logits are PEFT's."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pool = LoRAPool(model, num_slots=3, r_max=64)
    load = pool_loader(pool, adapters)
    slots = {name: load(name) for name in ADAPTERS}
    ranks_seen: list[tuple[str, int]] = []
    run_op = pool.op
    names_of = {id(layer.lora_a): name.rsplit(".", 1)[-1] for name, layer in pool.layers.items()}

    def recording(
        y: torch.Tensor,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        plan: SegmentPlan,
        rank: int | None,
    ) -> None:
        assert rank is not None
        ranks_seen.append((names_of[id(a)], rank))
        run_op(y, x, a, b, plan, rank)

    pool.op = recording
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 500, (3, 9), generator=torch.Generator().manual_seed(4))
    for names, expected_calls in [
        (["attn8", "__base__", "attn8"], {(module, 8): layers for module in ATTENTION}),
        (["mlp8", "all16", "attn8"], {(module, 16): layers for module in ALL_LINEAR}),
    ]:
        ranks_seen.clear()
        got = ours(model, pool, ids, [slots.get(name, EMPTY) for name in names])
        torch.testing.assert_close(
            got, peft_logits(tiny_llama_dir, adapters, ids, names), rtol=1e-5, atol=1e-5
        )
        counts: dict[tuple[str, int], int] = {}
        for seen in ranks_seen:
            counts[seen] = counts.get(seen, 0) + 1
        assert counts == expected_calls


def test_slot_reuse_leaves_nothing_of_the_previous_adapter(
    tiny_llama_dir: Path, adapters: dict[str, Path]
) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 500, (1, 10), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pool = LoRAPool(model, num_slots=1, r_max=16)  # one slot: every switch evicts
    load = pool_loader(pool, adapters)
    for name in ["all16", "mlp8", "attn8", "all16", "mlp8"]:
        slot = load(name)
        expected = peft_logits(tiny_llama_dir, {name: adapters[name]}, ids, [name])
        torch.testing.assert_close(ours(model, pool, ids, [slot]), expected, rtol=1e-5, atol=1e-5)
    pool.unload("mlp8")
    assert all(not layer.lora_a.any() and not layer.lora_b.any() for layer in pool.layers.values())
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=ids).logits
    torch.testing.assert_close(ours(model, pool, ids, [EMPTY]), base)


def test_adapters_the_pool_cannot_serve_are_refused(tiny_llama_dir: Path, adapters: dict[str, Path]) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    pool = LoRAPool(model, num_slots=2, r_max=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    with pytest.raises(ValueError, match="exceeds"):
        pool_loader(pool, adapters)("all16")
    with pytest.raises(ValueError, match="does not serve"):
        pool_loader(pool, adapters)("mlp8")
    assert pool.table.resident_keys() == []
