"""Per-request mixes through the adapter cache and the engine: a LINEAR mix of stored adapters gives
PEFT's `add_weighted_adapter(combination_type="cat")` greedy tokens while plain-adapter and base requests
share its batches; a mix is built once and then served from host RAM under its hash."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from openlora.v1 import common_pb2 as pb

from services.common.errors import InvalidArgument
from services.inference.adapter_cache import LoadedAdapter
from services.inference.adapter_cache.mixing import MIX_ID
from services.inference.engine.llm_engine import EngineConfig, LLMEngine
from services.inference.engine.sequence import SamplingParams
from services.inference.validation import mix_spec
from tests.integration.inference.cache_kit import Store, open_cache, start_store
from tests.integration.inference.hf_reference import peft_greedy, peft_with_adapters
from tests.kit.adapters import ATTENTION, make_peft_adapter

SPECS = {"poet": (8, 16, ATTENTION), "coder": (8, 8, ["q_proj", "v_proj", "down_proj"])}
WEIGHTS = {"poet": 0.7, "coder": 0.35}
MAX_NEW = 10


@pytest.fixture(scope="module")
def folders(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix-adapters")
    return {
        name: make_peft_adapter(tiny_llama_dir, root / name, rank=r, alpha=a, targets=t, seed=40 + i)
        for i, (name, (r, a, t)) in enumerate(SPECS.items())
    }


@pytest.fixture
async def store(tmp_path: Path, tiny_llama_dir: Path, folders: dict[str, Path]) -> AsyncIterator[Store]:
    running = await start_store(tmp_path / "store", tiny_llama_dir)
    for name, folder in folders.items():
        await running.upload(folder, name)
    yield running
    await running.stop()


def wire_mix(strategy: int = pb.LINEAR, **kwargs: float | int) -> pb.AdapterMix:
    return pb.AdapterMix(
        components=[pb.Component(adapter=pb.AdapterRef(id=n), weight=w) for n, w in WEIGHTS.items()],
        strategy=strategy,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


def peft_reference(
    base_dir: Path, folders: dict[str, Path], jobs: list[tuple[list[int], str | None]]
) -> list[list[int]]:
    peft = peft_with_adapters(base_dir, folders)
    names = list(folders)
    peft.add_weighted_adapter(names, [WEIGHTS[n] for n in names], "mixed", combination_type="cat")
    return peft_greedy(peft, jobs, MAX_NEW)


async def test_linear_mix_through_the_engine_equals_peft_cat(
    store: Store, tiny_llama_dir: Path, folders: dict[str, Path], tmp_path: Path
) -> None:
    cache = await open_cache(store, tmp_path / "cache")
    mixed = (await cache.get_mix(mix_spec(wire_mix()), max_rank=16)).adapter
    assert mixed.id == MIX_ID and mixed.rank == 16 and mixed.scaling == 1.0  # q_proj, v_proj: 8 + 8
    assert [(i, round(share, 6)) for i, _, share in mixed.components] == [
        ("poet", 0.666667),
        ("coder", 0.333333),
    ]
    singles = {name: (await cache.get(name)).adapter for name in folders}

    gen = torch.Generator().manual_seed(5)
    rows = [("mixed", 12), ("poet", 7), (None, 20), ("mixed", 30), ("coder", 9), ("mixed", 4)]
    jobs = [(torch.randint(3, 500, (n,), generator=gen).tolist(), name) for name, n in rows]
    expected = peft_reference(tiny_llama_dir, folders, jobs)

    engine = LLMEngine.from_pretrained(
        tiny_llama_dir, EngineConfig(lora_slots=2, lora_max_rank=16, kv_cache_bytes=8 << 20, max_num_seqs=4)
    )
    adapters: dict[str, LoadedAdapter] = {"mixed": mixed, **singles}
    for adapter in adapters.values():
        engine.add_adapter(adapter.key, adapter)
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    seqs = [
        engine.add_request(f"r{i}", prompt, params, adapter_key=adapters[name].key if name else None)
        for i, (prompt, name) in enumerate(jobs)
    ]
    while any(not s.is_finished for s in seqs):
        engine.step()
    assert [list(s.output_token_ids) for s in seqs] == expected
    await cache.close()


async def test_a_mix_is_built_once_then_served_from_host_ram(store: Store, tmp_path: Path) -> None:
    cache = await open_cache(store, tmp_path / "cache")
    spec = mix_spec(wire_mix(pb.TIES, density=0.5, rank=4))
    entries = await asyncio.gather(*(cache.get_mix(spec) for _ in range(10)))
    first, *joined = [entry.adapter for entry in entries]
    assert all(other is first for other in joined)
    assert entries[0].tier == "mix" and entries[0].load_seconds > 0  # built once, the others joined
    assert first.rank == 4 and cache.stats().load_seconds["mix"]  # one build, timed as a "mix" load
    builds = len(cache.stats().load_seconds["mix"])
    again = (await cache.get_mix(spec)).adapter
    assert again is first and len(cache.stats().load_seconds["mix"]) == builds == 1
    assert first.key in cache.host and cache.resident(first.key) is first  # the engine's lookup finds it

    # Anything that changes the weights is another mix; a DARE mix is the same under the same seed.
    other = (await cache.get_mix(mix_spec(wire_mix(pb.TIES, density=0.4, rank=4)))).adapter
    assert other.key != first.key
    dare = [
        (await cache.get_mix(mix_spec(wire_mix(pb.DARE_LINEAR, density=0.5, seed=s)))).adapter
        for s in (1, 1, 2)
    ]
    assert dare[0] is dare[1] and dare[2].key != dare[0].key
    for path, (a, b) in dare[0].weights.items():
        assert not torch.equal(b @ a, dare[2].weights[path][1] @ dare[2].weights[path][0])
    await cache.close()


async def test_mixes_the_engine_cannot_serve_are_refused_before_any_work(
    store: Store, tmp_path: Path
) -> None:
    cache = await open_cache(store, tmp_path / "cache")
    with pytest.raises(InvalidArgument, match="sum of the component ranks") as refused:
        await cache.get_mix(mix_spec(wire_mix()), max_rank=8)
    assert refused.value.field == "adapter_mix"
    assert not cache.stats().load_seconds["mix"]
    await cache.close()


@pytest.mark.parametrize(
    ("mix", "field"),
    [
        (pb.AdapterMix(components=wire_mix().components), "adapter_mix.strategy"),
        (pb.AdapterMix(strategy=pb.LINEAR), "adapter_mix.components"),
        (pb.AdapterMix(strategy=pb.TIES, components=wire_mix().components, density=0), "adapter_mix.density"),
        (
            pb.AdapterMix(strategy=pb.TIES, components=wire_mix().components, density=1.5),
            "adapter_mix.density",
        ),
        (
            pb.AdapterMix(
                strategy=pb.LINEAR, components=[pb.Component(adapter=pb.AdapterRef(id="poet"), weight=0)]
            ),
            "adapter_mix.components[0].weight",
        ),
        (
            pb.AdapterMix(
                strategy=pb.LINEAR,
                components=[pb.Component(adapter=pb.AdapterRef(id="poet"), weight=float("nan"))],
            ),
            "adapter_mix.components[0].weight",
        ),
        (
            pb.AdapterMix(strategy=pb.LINEAR, components=[pb.Component(weight=1)]),
            "adapter_mix.components[0].adapter.id",
        ),
        (
            pb.AdapterMix(
                strategy=pb.LINEAR,
                components=[pb.Component(adapter=pb.AdapterRef(id="poet"), weight=1)] * 2,
            ),
            "adapter_mix.components[1].adapter",
        ),
    ],
)
def test_bad_wire_mixes_name_the_field(mix: pb.AdapterMix, field: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        mix_spec(mix)
    assert refused.value.field == field
