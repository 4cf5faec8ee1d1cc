"""Adapter handoff files: what the front writes is what the engine maps, bit for bit; files go when
their adapter leaves host RAM, and a reader never sees half a file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.inference.engine_process.handoff import HandoffReader, HandoffWriter, read_adapter_file


def weights(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.1.mlp.down_proj": (128, 48)}
    return {
        path: (torch.randn(5, d_in, generator=g), torch.randn(d_out, 5, generator=g))
        for path, (d_in, d_out) in shapes.items()
    }


def test_the_engine_reads_exactly_what_the_front_wrote(tmp_path: Path) -> None:
    writer = HandoffWriter(tmp_path)
    original = weights(1)
    handle = writer.publish("hf://org/name@v1", original, 5, 1.5)
    assert "/" not in Path(handle.path).name and not list(writer.directory.glob("*.partial"))
    reader = HandoffReader()
    reader.learn([handle])
    mapped = reader.lookup(handle.key)
    assert (mapped.rank, mapped.scaling) == (5, 1.5)
    assert mapped.weights.keys() == original.keys()
    for path, (a, b) in original.items():
        assert torch.equal(mapped.weights[path][0], a) and torch.equal(mapped.weights[path][1], b)
    assert writer.publish("hf://org/name@v1", weights(2), 5, 1.5) == handle  # written once per key
    writer.close()
    assert not tmp_path.joinpath(writer.directory.name).exists()


def test_sweep_removes_the_files_of_adapters_let_go(tmp_path: Path) -> None:
    writer = HandoffWriter(tmp_path)
    kept = writer.publish("kept@1", weights(1), 5, 1.0)
    gone = writer.publish("gone@1", weights(2), 5, 1.0)
    assert writer.sweep(lambda key: key == "kept@1") == 1
    assert Path(kept.path).exists() and not Path(gone.path).exists()
    assert writer.published("gone@1") is None
    writer.close()


def test_an_unannounced_adapter_or_a_foreign_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="no handoff file"):
        HandoffReader().lookup("never@1")
    foreign = tmp_path / "foreign"
    foreign.write_bytes(b"not an adapter at all")
    with pytest.raises(ValueError, match="not an adapter handoff file"):
        read_adapter_file(foreign)
