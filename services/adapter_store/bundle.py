"""What an upload or import may contain, and how a tar archive is unpacked safely.

Accepted: the two PEFT files (`adapter_config.json`, `adapter_model.safetensors`), or one tar archive
(optionally gzip-compressed) holding them, at the top or inside one folder. Pickle weights are refused
by name and never opened. Tar members that are links, devices, absolute paths or climb out with `..`
are refused; other plain files (a README) are skipped without being extracted.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from services.adapter_store.safetensors_file import FIELD as WEIGHTS
from services.adapter_store.validation import CONFIG
from services.common.errors import InvalidArgument

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_CONFIG_BYTES = 1024 * 1024


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes
    weights: Path


def refuse_pickle(name: str, field: str) -> None:
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise InvalidArgument(
            field,
            f"{name!r} is a pickle file; pickles can run code when loaded and are never accepted: "
            "save the adapter with safetensors (PEFT's default)",
        )


def check_names(names: list[str], field: str = "files") -> None:
    """The list of names an upload or import declares must be one archive or the two PEFT files."""
    for i, name in enumerate(names):
        refuse_pickle(name, f"{field}[{i}].name")
    if len(names) == 1 and names[0].lower().endswith(ARCHIVE_SUFFIXES):
        return
    if sorted(names) != sorted([CONFIG, WEIGHTS]):
        raise InvalidArgument(
            field,
            f"expected {CONFIG} and {WEIGHTS}, or one .tar archive of them; "
            f"got {', '.join(names) or 'nothing'}",
        )


def unpack(staged: dict[str, Path], workdir: Path, max_bytes: int) -> AdapterFiles:
    """From the staged files of an upload or import, the config bytes and the weights file."""
    if len(staged) == 1:
        ((name, path),) = staged.items()
        return _from_archive(name, path, workdir, max_bytes)
    config_path = staged.get(CONFIG)
    weights = staged.get(WEIGHTS)
    if config_path is None or weights is None:
        raise InvalidArgument("files", f"need both {CONFIG} and {WEIGHTS}")
    if config_path.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidArgument(CONFIG, f"is larger than {MAX_CONFIG_BYTES} bytes")
    return AdapterFiles(config_path.read_bytes(), weights)


def _from_archive(name: str, path: Path, workdir: Path, max_bytes: int) -> AdapterFiles:
    try:
        archive = tarfile.open(path, mode="r:*")  # noqa: SIM115 - closed by the `with archive` below
    except (tarfile.TarError, OSError, EOFError):
        raise InvalidArgument(name, "is not a readable tar archive") from None
    found: dict[str, Path] = {}
    total = 0
    with archive:
        try:
            members = archive.getmembers()
        except (tarfile.TarError, OSError, EOFError):
            raise InvalidArgument(name, "is a corrupt or truncated tar archive") from None
        for member in members:
            if member.isdir():
                continue
            member_path = PurePosixPath(member.name)
            if member_path.is_absolute() or ".." in member_path.parts:
                raise InvalidArgument(name, f"member {member.name!r} points outside the archive")
            if not member.isfile():
                raise InvalidArgument(
                    name, f"member {member.name!r} is a link or special file; only plain files"
                )
            if len(member_path.parts) > 2:
                raise InvalidArgument(name, f"member {member.name!r} is nested too deep (at most one folder)")
            base = member_path.name
            refuse_pickle(base, f"{name}:{member.name}")
            total += member.size
            if total > max_bytes:
                raise InvalidArgument(name, f"unpacks to more than the {max_bytes}-byte limit")
            if base not in (CONFIG, WEIGHTS):
                continue
            if base in found:
                raise InvalidArgument(name, f"holds {base} twice")
            if base == CONFIG and member.size > MAX_CONFIG_BYTES:
                raise InvalidArgument(CONFIG, f"is larger than {MAX_CONFIG_BYTES} bytes")
            source = archive.extractfile(member)
            if source is None:
                raise InvalidArgument(name, f"member {member.name!r} cannot be read")
            target = workdir / f"unpacked-{base}"
            try:
                with source, open(target, "wb") as out:
                    while block := source.read(1 << 20):
                        out.write(block)
            except (tarfile.TarError, OSError, EOFError):
                raise InvalidArgument(name, f"member {member.name!r} is truncated") from None
            found[base] = target
    missing = [n for n in (CONFIG, WEIGHTS) if n not in found]
    if missing:
        raise InvalidArgument(name, f"does not contain {' or '.join(missing)}")
    return AdapterFiles(found[CONFIG].read_bytes(), found[WEIGHTS])
