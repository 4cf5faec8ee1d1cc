"""What an upload or import may contain, and how a tar archive is unpacked safely.

Accepted: the two PEFT files (`adapter_config.json`, `adapter_model.safetensors`), or one tar archive
(optionally gzip-compressed) holding them, at the top or inside one folder; with either, the adapter's
own chat template as `chat_template.jinja` or in a `tokenizer_config.json` (only its `chat_template`
is kept), which must parse as Jinja. Pickle weights are refused
by name and never opened. Tar members that are links, devices, absolute paths or climb out with `..`
are refused; other plain files (a README) are skipped without being extracted.
"""

from __future__ import annotations

import json
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import jinja2

from services.adapter_store.safetensors_file import FIELD as WEIGHTS
from services.adapter_store.validation import CONFIG
from services.common.errors import InvalidArgument

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MAX_CONFIG_BYTES = 1024 * 1024
MAX_EXTENDED_HEADER_BYTES = 64 * 1024  # PAX records and long names: a few paths' worth
CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


TEMPLATE_FILES = (CHAT_TEMPLATE, TOKENIZER_CONFIG)
MAX_TEMPLATE_BYTES = 256 * 1024


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes
    weights: Path
    chat_template: str = ""


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
    required = [n for n in names if n not in TEMPLATE_FILES]
    templates = [n for n in names if n in TEMPLATE_FILES]
    if sorted(required) != sorted([CONFIG, WEIGHTS]) or len(templates) > 1:
        raise InvalidArgument(
            field,
            f"expected {CONFIG} and {WEIGHTS} (and at most one of {' or '.join(TEMPLATE_FILES)}), "
            f"or one .tar archive of them; got {', '.join(names) or 'nothing'}",
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
    template = next(((n, p) for n, p in staged.items() if n in TEMPLATE_FILES), None)
    chat_template = chat_template_of(*template) if template else ""
    return AdapterFiles(config_path.read_bytes(), weights, chat_template)


def chat_template_of(name: str, path: Path) -> str:
    """The chat template a `chat_template.jinja` or `tokenizer_config.json` holds ("" when the config
    has none), checked to parse as Jinja: a template the workers cannot render is refused here."""
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise InvalidArgument(name, f"is larger than {MAX_TEMPLATE_BYTES} bytes")
    try:
        text = path.read_text("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument(name, "is not UTF-8 text") from None
    if name == TOKENIZER_CONFIG:
        try:
            config = json.loads(text)
        except (ValueError, RecursionError):  # RecursionError: nested too deep
            raise InvalidArgument(name, "is not valid JSON (or is nested too deep)") from None
        found = config.get("chat_template") if isinstance(config, dict) else None
        if isinstance(found, list):  # named templates, as transformers saves several: the default
            found = next(
                (t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"), None
            )
        if found is None:
            return ""
        if not isinstance(found, str):
            raise InvalidArgument(f"{name}.chat_template", "must be a string (or named templates)")
        text = found
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as exc:
        raise InvalidArgument(
            name, f"the chat template does not parse: {exc.message} (line {exc.lineno})"
        ) from None
    return text


def _from_archive(name: str, path: Path, workdir: Path, max_bytes: int) -> AdapterFiles:
    """Read the archive once, front to back, refusing at a member's header what is too big: a small
    .tar.gz can declare gigabytes, and nothing is decompressed past the limit (or held in memory for
    an oversized extended header) before the refusal."""
    try:
        archive = tarfile.open(path, mode="r|*", tarinfo=_BoundedTarInfo)  # noqa: SIM115 - closed below
    except _HeaderTooLarge as exc:  # the first header is read on opening
        raise InvalidArgument(name, str(exc)) from None
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        raise InvalidArgument(name, "is not a readable tar archive") from None
    found: dict[str, Path] = {}
    total = 0
    with archive:
        try:
            for member in archive:
                total += member.size
                _check_member(name, member, total, max_bytes)
                base = PurePosixPath(member.name).name
                if member.isdir() or base not in (CONFIG, WEIGHTS, *TEMPLATE_FILES):
                    continue
                if base in found:
                    raise InvalidArgument(name, f"holds {base} twice")
                if base == CONFIG and member.size > MAX_CONFIG_BYTES:
                    raise InvalidArgument(CONFIG, f"is larger than {MAX_CONFIG_BYTES} bytes")
                found[base] = _extract(archive, member, workdir / f"unpacked-{base}", name)
        except _HeaderTooLarge as exc:
            raise InvalidArgument(name, str(exc)) from None
        except (tarfile.TarError, OSError, EOFError, zlib.error):
            raise InvalidArgument(name, "is a corrupt or truncated tar archive") from None
    missing = [n for n in (CONFIG, WEIGHTS) if n not in found]
    if missing:
        raise InvalidArgument(name, f"does not contain {' or '.join(missing)}")
    templates = [(n, found[n]) for n in TEMPLATE_FILES if n in found]
    if len(templates) > 1:
        raise InvalidArgument(name, f"holds both {CHAT_TEMPLATE} and {TOKENIZER_CONFIG}: keep one")
    chat_template = chat_template_of(*templates[0]) if templates else ""
    return AdapterFiles(found[CONFIG].read_bytes(), found[WEIGHTS], chat_template)


def _check_member(name: str, member: tarfile.TarInfo, total: int, max_bytes: int) -> None:
    """A member's header, checked before a byte of its data is read."""
    member_path = PurePosixPath(member.name)
    if member_path.is_absolute() or ".." in member_path.parts:
        raise InvalidArgument(name, f"member {member.name!r} points outside the archive")
    if member.isdir():
        return
    if not member.isfile():
        raise InvalidArgument(name, f"member {member.name!r} is a link or special file; only plain files")
    if len(member_path.parts) > 2:
        raise InvalidArgument(name, f"member {member.name!r} is nested too deep (at most one folder)")
    refuse_pickle(member_path.name, f"{name}:{member.name}")
    if total > max_bytes:
        raise InvalidArgument(name, f"unpacks to more than the {max_bytes}-byte limit")


def _extract(archive: tarfile.TarFile, member: tarfile.TarInfo, target: Path, name: str) -> Path:
    source = archive.extractfile(member)
    if source is None:
        raise InvalidArgument(name, f"member {member.name!r} cannot be read")
    try:
        with source, open(target, "wb") as out:
            while block := source.read(1 << 20):
                out.write(block)
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        raise InvalidArgument(name, f"member {member.name!r} is truncated") from None
    return target


class _HeaderTooLarge(Exception):
    pass


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX extended header or a GNU long name into memory whole, whatever size its
    header declares (a 1 MB .tar.gz can declare 1 GiB): refuse those over a small bound first.
    (`_proc_member` is tarfile's dispatch of a header by type, unchanged since Python 3.0.)"""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        held_whole = (
            tarfile.GNUTYPE_LONGNAME,
            tarfile.GNUTYPE_LONGLINK,
            tarfile.XHDTYPE,
            tarfile.XGLTYPE,
            tarfile.SOLARIS_XHDTYPE,
        )
        if self.type in held_whole and self.size > MAX_EXTENDED_HEADER_BYTES:
            raise _HeaderTooLarge(
                f"declares an extended header of {self.size} bytes (at most {MAX_EXTENDED_HEADER_BYTES})"
            )
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return member
