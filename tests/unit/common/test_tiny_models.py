from __future__ import annotations

from pathlib import Path

from services.cluster.tiny_models import build_tiny_model


def test_same_seed_same_model(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", "llama", seed=3)
    second = build_tiny_model(tmp_path / "b", "llama", seed=3)
    other = build_tiny_model(tmp_path / "c", "llama", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
