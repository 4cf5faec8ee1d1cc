"""Lint the wire contracts in protos/ (exit 1 on any finding).

Rules, checked on the compiled descriptors so comments and nesting are seen as protoc sees them:
- the package is versioned (`name.v1`, `name.v2beta1`) and matches the file's directory;
- message, enum, service and rpc names are PascalCase; field names are lower_snake_case;
- enum values are UPPER_SNAKE_CASE and the zero value is `<ENUM_NAME>_UNSPECIFIED`;
- every message, field, enum, enum value, service and rpc carries a leading comment.

Enum values other than the zero value are not forced to carry the enum's prefix: the contract in
ARCHITECTURE.md names them bare (`LINEAR`, `STOP`), and protoc already refuses a clash inside a package.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"

_VERSIONED_PACKAGE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*\.v\d+((alpha|beta)\d*)?$")
_PASCAL = re.compile(r"^[A-Z][A-Za-z0-9]*$")
_SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")
_UPPER_SNAKE = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)*$")

# Field numbers of FileDescriptorProto / DescriptorProto / ... used to build source-info paths.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE = 4, 5, 6
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2


def compile_descriptors(proto_root: Path, files: Sequence[Path]) -> descriptor_pb2.FileDescriptorSet:
    from gen_protos import protoc_includes  # scripts/ is on sys.path wherever this module is imported
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        args = [
            "grpc_tools.protoc",
            *protoc_includes(proto_root),
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(f.relative_to(proto_root)) for f in files),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed to compile the protos")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _snake_to_upper(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def _lint_file(fd: descriptor_pb2.FileDescriptorProto) -> Iterator[str]:
    comments = {tuple(loc.path): loc.leading_comments.strip() for loc in fd.source_code_info.location}

    def documented(path: tuple[int, ...], what: str) -> Iterator[str]:
        if not comments.get(path):
            yield f"{fd.name}: {what} has no leading comment"

    if not _VERSIONED_PACKAGE.match(fd.package):
        yield f"{fd.name}: package {fd.package!r} is not versioned (e.g. openlora.v1)"
    expected_dir = fd.package.replace(".", "/")
    if str(Path(fd.name).parent) != expected_dir:
        yield f"{fd.name}: package {fd.package!r} should live in {expected_dir}/"

    def lint_enum(
        enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], scope: str
    ) -> Iterator[str]:
        full = f"{scope}{enum.name}"
        if not _PASCAL.match(enum.name):
            yield f"{fd.name}: enum {full} is not PascalCase"
        yield from documented(path, f"enum {full}")
        zero = [v for v in enum.value if v.number == 0]
        want = f"{_snake_to_upper(enum.name)}_UNSPECIFIED"
        if not zero or zero[0].name != want:
            yield f"{fd.name}: enum {full} must have zero value {want}"
        for i, value in enumerate(enum.value):
            if not _UPPER_SNAKE.match(value.name):
                yield f"{fd.name}: enum value {full}.{value.name} is not UPPER_SNAKE_CASE"
            yield from documented((*path, _ENUM_VALUE, i), f"enum value {full}.{value.name}")

    def lint_message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...], scope: str) -> Iterator[str]:
        full = f"{scope}{msg.name}"
        if not _PASCAL.match(msg.name):
            yield f"{fd.name}: message {full} is not PascalCase"
        if not msg.options.map_entry:
            yield from documented(path, f"message {full}")
        for i, field in enumerate(msg.field):
            if not _SNAKE.match(field.name):
                yield f"{fd.name}: field {full}.{field.name} is not lower_snake_case"
            if not msg.options.map_entry:
                yield from documented((*path, _MSG_FIELD, i), f"field {full}.{field.name}")
        for i, nested in enumerate(msg.nested_type):
            yield from lint_message(nested, (*path, _MSG_NESTED, i), f"{full}.")
        for i, enum in enumerate(msg.enum_type):
            yield from lint_enum(enum, (*path, _MSG_ENUM, i), f"{full}.")

    for i, msg in enumerate(fd.message_type):
        yield from lint_message(msg, (_FILE_MESSAGE, i), "")
    for i, enum in enumerate(fd.enum_type):
        yield from lint_enum(enum, (_FILE_ENUM, i), "")
    for i, service in enumerate(fd.service):
        if not _PASCAL.match(service.name):
            yield f"{fd.name}: service {service.name} is not PascalCase"
        yield from documented((_FILE_SERVICE, i), f"service {service.name}")
        for j, method in enumerate(service.method):
            if not _PASCAL.match(method.name):
                yield f"{fd.name}: rpc {service.name}.{method.name} is not PascalCase"
            yield from documented((_FILE_SERVICE, i, _SERVICE_METHOD, j), f"rpc {service.name}.{method.name}")


def lint(proto_root: Path, files: Sequence[Path]) -> list[str]:
    descriptors = compile_descriptors(proto_root, files)
    wanted = {str(f.relative_to(proto_root)) for f in files}
    return [problem for fd in descriptors.file if fd.name in wanted for problem in _lint_file(fd)]


def main() -> int:
    files = sorted(PROTO_ROOT.rglob("*.proto"))
    problems = lint(PROTO_ROOT, files)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    print(f"proto lint clean ({len(files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
