from __future__ import annotations

import json

import pytest

from services.adapter_store.base_models import spec_from_config
from services.adapter_store.ids import check_id, check_version, id_from_key, id_key, new_version
from services.common.errors import InvalidArgument


@pytest.mark.parametrize("good", ["a", "acme/poet", "x.y_z-1", "0" * 128, f"{'o' * 128}/{'n' * 128}"])
def test_valid_ids(good: str) -> None:
    assert check_id(good) == good
    assert id_from_key(id_key(good)) == good and "/" not in id_key(good)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "..",
        "../etc/passwd",
        "a/../b",
        "a/b/c",
        "/abs",
        "Upper",
        "sp ace",
        "nul\x00",
        "-lead",
        ".hidden",
        "a" * 129,
        "a//b",
        "a/",
        "tab\t",
        "ünï",
    ],
)
def test_invalid_ids(bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_id(bad)
    assert caught.value.field == "id"


def test_versions_sort_by_creation_and_are_unique() -> None:
    versions = [new_version() for _ in range(200)]
    assert len(set(versions)) == 200
    assert versions == sorted(versions)  # even when many fall in one millisecond
    assert all(check_version(v) == v for v in versions)
    with pytest.raises(InvalidArgument):
        check_version("../v1")


def test_shapes_from_a_gqa_config() -> None:
    config = {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "num_hidden_layers": 30,
    }
    spec = spec_from_config("HuggingFaceTB/SmolLM2-135M-Instruct", json.dumps(config))
    shapes = {n: (m.in_features, m.out_features) for n, m in spec.modules.items()}
    assert shapes == {
        "q_proj": (576, 576),
        "k_proj": (576, 192),
        "v_proj": (576, 192),
        "o_proj": (576, 576),
        "gate_proj": (576, 1536),
        "up_proj": (576, 1536),
        "down_proj": (1536, 576),
    }
    assert spec.num_layers == 30
    assert type(spec).from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ("{oops", "config_json"),
        ('{"model_type": "gpt2"}', "config_json.model_type"),
        ('{"model_type": "llama", "hidden_size": -1}', "config_json.hidden_size"),
    ],
)
def test_bad_base_model_configs(config: str, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        spec_from_config("m", config)
    assert caught.value.field == field
