"""Ways an adapter upload can be wrong: each builds the files to send and names the refusal expected."""

from __future__ import annotations

import gzip
import io
import json
import pickle
import struct
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save

Files = dict[str, bytes]


@dataclass(frozen=True)
class BadCase:
    files: Callable[[Path], Files]  # from the good adapter's folder
    expect: str  # a fragment of the refusal message
    header_id: str = "bad-adapter"
    base_model: str | None = None


def good(folder: Path) -> Files:
    return {n: (folder / n).read_bytes() for n in ("adapter_config.json", "adapter_model.safetensors")}


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return dict(load((folder / "adapter_model.safetensors").read_bytes()))


def with_config(folder: Path, **changes: object) -> Files:
    files = good(folder)
    config = json.loads(files["adapter_config.json"])
    config.update(changes)
    for key, value in list(config.items()):
        if value is None and key in changes:
            del config[key]
    files["adapter_config.json"] = json.dumps(config).encode()
    return files


def with_tensors(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Files:
    files = good(folder)
    weights = tensors(folder)
    edit(weights)
    files["adapter_model.safetensors"] = bytes(save(weights))
    return files


def with_weights_bytes(folder: Path, edit: Callable[[bytes], bytes]) -> Files:
    files = good(folder)
    files["adapter_model.safetensors"] = edit(files["adapter_model.safetensors"])
    return files


def tar_of(members: list[tarfile.TarInfo], payloads: dict[str, bytes]) -> Files:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for info in members:
            data = payloads.get(info.name)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return {"adapter.tar": buffer.getvalue()}


def traversal_tar(folder: Path) -> Files:
    files = good(folder)
    infos = []
    for name, data in (
        ("../adapter_config.json", files["adapter_config.json"]),
        ("adapter_model.safetensors", files["adapter_model.safetensors"]),
    ):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        infos.append(info)
    return tar_of(
        infos,
        {
            "../adapter_config.json": files["adapter_config.json"],
            "adapter_model.safetensors": files["adapter_model.safetensors"],
        },
    )


def symlink_tar(folder: Path) -> Files:
    files = good(folder)
    link = tarfile.TarInfo("adapter_config.json")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    weights = tarfile.TarInfo("adapter_model.safetensors")
    weights.size = len(files["adapter_model.safetensors"])
    return tar_of([link, weights], {"adapter_model.safetensors": files["adapter_model.safetensors"]})


def rename(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(weights: dict[str, torch.Tensor]) -> None:
        for name in [n for n in weights if old in n]:
            weights[name.replace(old, new)] = weights.pop(name)

    return edit


def first_a(weights: dict[str, torch.Tensor]) -> str:
    return sorted(n for n in weights if "lora_A" in n)[0]


def widen_first_a(weights: dict[str, torch.Tensor]) -> None:
    name = first_a(weights)
    weights[name] = torch.zeros(weights[name].shape[0], weights[name].shape[1] + 8)


def nan_in_first_a(weights: dict[str, torch.Tensor]) -> None:
    weights[first_a(weights)][0, 0] = float("nan")


def drop_first_b(weights: dict[str, torch.Tensor]) -> None:
    del weights[sorted(n for n in weights if "lora_B" in n)[0]]


def to_float64(weights: dict[str, torch.Tensor]) -> None:
    for name in weights:
        weights[name] = weights[name].double()


def bad_layer(weights: dict[str, torch.Tensor]) -> None:
    rename("layers.1.", "layers.7.")(weights)


def extra_tensor(weights: dict[str, torch.Tensor]) -> None:
    weights["base_model.model.lm_head.weight"] = torch.zeros(4, 4)


def huge_header_length(data: bytes) -> bytes:
    return struct.pack("<Q", 1 << 40) + data[8:]


def garbage_header(data: bytes) -> bytes:
    n = int.from_bytes(data[:8], "little")
    return data[:8] + b"{" * n + data[8 + n :]


def declared_but_absent(kind: bytes, size: int, name: str = "adapter_model.safetensors") -> Files:
    """A gzipped tar of kilobytes whose first header declares `size` bytes (of a member, or of a PAX
    extended header) that are not there: a reader that trusts sizes only after reading the data
    decompresses, or holds, all of it first."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    header = info.tobuf(tarfile.USTAR_FORMAT)
    return {"adapter.tar.gz": gzip.compress(header + b"\0" * 1024)}


def deeply_nested(depth: int = 100_000) -> bytes:
    """Valid JSON nesting deeper than Python's recursion limit: a parser must refuse it cleanly."""
    return b'{"x": ' + b"[" * depth + b"]" * depth + b"}"


def nested_header(data: bytes) -> bytes:
    header = deeply_nested()
    return struct.pack("<Q", len(header)) + header


def truncated(data: bytes) -> bytes:
    return data[:-100]


# What a payload below would create if anything unpickled it or unpacked it where it points.
SENTINEL = Path(tempfile.gettempdir()) / "openlora-bad-adapter-payload-ran"


class _WritesSentinel:
    """Unpickled, this opens SENTINEL for writing (creating it): pickle runs what __reduce__ names."""

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(SENTINEL), "w"))


def pickle_payload() -> bytes:
    return pickle.dumps({"base_model.model.lm_head.weight": _WritesSentinel()})


def pickle_files(folder: Path, name: str = "adapter_model.bin") -> Files:
    return {"adapter_config.json": good(folder)["adapter_config.json"], name: pickle_payload()}


def regular_members(files: Files) -> list[tarfile.TarInfo]:
    infos = []
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        infos.append(info)
    return infos


def pickle_in_tar(folder: Path) -> Files:
    files = pickle_files(folder)
    return tar_of(regular_members(files), files)


def tar_member_at(path: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> Callable[[Path], Files]:
    """A tar of the good adapter plus one member named `path` (a file, or a link to `link`)."""

    def build(folder: Path) -> Files:
        files = good(folder)
        infos = regular_members(files)
        extra = tarfile.TarInfo(path)
        extra.type, extra.linkname = kind, link
        payload = b"written by a tar member" if kind == tarfile.REGTYPE else None
        if payload is not None:
            extra.size = len(payload)
        return tar_of([extra, *infos], {**files, **({path: payload} if payload else {})})

    return build


CASES: dict[str, BadCase] = {
    "pickle weights": BadCase(
        lambda f: {
            "adapter_config.json": good(f)["adapter_config.json"],
            "adapter_model.bin": b"\x80\x04pickle",
        },
        "pickle",
    ),
    "pickle that writes a file when loaded": BadCase(pickle_files, "pickle"),
    "pickle .pt that writes a file when loaded": BadCase(
        lambda f: pickle_files(f, "adapter_model.pt"), "pickle"
    ),
    "pickle inside a tar": BadCase(pickle_in_tar, "pickle"),
    "tar member at an absolute path": BadCase(tar_member_at(str(SENTINEL)), "outside the archive"),
    "tar member climbing out": BadCase(tar_member_at(f"../../../..{SENTINEL}"), "outside the archive"),
    "tar hard link out": BadCase(
        tar_member_at("adapter_model.bin", tarfile.LNKTYPE, "/etc/passwd"), "link or special file"
    ),
    "tar device file": BadCase(tar_member_at("dev-null", tarfile.CHRTYPE), "link or special file"),
    "config not json": BadCase(lambda f: good(f) | {"adapter_config.json": b"{not json"}, "not valid JSON"),
    "config without r": BadCase(lambda f: with_config(f, r=None), "adapter_config.json.r"),
    "config without alpha": BadCase(lambda f: with_config(f, lora_alpha=None), "lora_alpha"),
    "rank over the limit": BadCase(lambda f: with_config(f, r=512), "exceeds this store's limit"),
    "dora": BadCase(lambda f: with_config(f, use_dora=True), "use_dora"),
    "not lora": BadCase(lambda f: with_config(f, peft_type="PREFIX_TUNING"), "is not LORA"),
    "header length past the file": BadCase(
        lambda f: with_weights_bytes(f, huge_header_length), "header length"
    ),
    "header not json": BadCase(lambda f: with_weights_bytes(f, garbage_header), "header is not valid JSON"),
    "truncated weights": BadCase(lambda f: with_weights_bytes(f, truncated), "adapter_model.safetensors"),
    "tensor that is not lora": BadCase(
        lambda f: with_tensors(f, extra_tensor), "is not a lora_A/lora_B weight"
    ),
    "unknown target module": BadCase(
        lambda f: with_tensors(f, rename("q_proj", "qkv_proj")), "does not have"
    ),
    "layer past the model": BadCase(lambda f: with_tensors(f, bad_layer), "is for layer 7"),
    "shape off the base model": BadCase(lambda f: with_tensors(f, widen_first_a), "needs"),
    "dtype not allowed": BadCase(lambda f: with_tensors(f, to_float64), "dtype F64"),
    "nan weights": BadCase(lambda f: with_tensors(f, nan_in_first_a), "NaN or Inf"),
    "unpaired lora_A": BadCase(lambda f: with_tensors(f, drop_first_b), "no lora_B"),
    "tar path traversal": BadCase(traversal_tar, "outside the archive"),
    "tar symlink": BadCase(symlink_tar, "link or special file"),
    "unknown base model": BadCase(good, "not registered", base_model="some/other-model"),
    "id with path tricks": BadCase(good, "not a valid adapter id", header_id="../../etc/passwd"),
    "id with nul": BadCase(good, "not a valid adapter id", header_id="ok\x00id"),
    "id with spaces": BadCase(good, "not a valid adapter id", header_id="my adapter"),
    "id too deep": BadCase(good, "not a valid adapter id", header_id="a/b/c"),
    "config targets fewer modules than the weights": BadCase(
        lambda f: with_config(f, target_modules=["q_proj"]), "does not cover modules the weights adapt"
    ),
    "config target regex missing modules": BadCase(
        lambda f: with_config(f, target_modules=r".*\.q_proj"), "does not cover modules the weights adapt"
    ),
    "config nested too deep": BadCase(
        lambda f: good(f) | {"adapter_config.json": deeply_nested()}, "nested too deep"
    ),
    "header nested too deep": BadCase(lambda f: with_weights_bytes(f, nested_header), "nested too deep"),
    "tar member of 6 GiB": BadCase(
        lambda f: declared_but_absent(tarfile.REGTYPE, 6 << 30), "unpacks to more than the"
    ),
    "tar extended header of 1 GiB": BadCase(
        lambda f: declared_but_absent(tarfile.XHDTYPE, 1 << 30, "././@PaxHeader"), "extended header of"
    ),
    "tar long name of 1 GiB": BadCase(
        lambda f: declared_but_absent(tarfile.GNUTYPE_LONGNAME, 1 << 30, "././@LongLink"),
        "extended header of",
    ),
}
