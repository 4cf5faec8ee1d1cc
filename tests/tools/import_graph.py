"""The import graph of the services and the client: prints it by package, fails on a circle or a
cross-service import.

    python -m tests.tools.import_graph          # exit 1 and the offending imports when a rule breaks

Rules (every import counts, inside functions too; only `if TYPE_CHECKING:` blocks are left out):
- a service package (gateway, inference, adapter_store, attribution) imports only itself,
  `services.common` and the client `openlora`;
- `services.common` imports only itself and `openlora`; `openlora` imports nothing of the server;
- `services.cli` and `services.cluster` assemble the rest and may import any of it;
- no module imports itself back through others (a circle), anywhere.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"services": ROOT / "services", "openlora": ROOT / "clients" / "python" / "openlora"}
SERVICES = ("gateway", "inference", "adapter_store", "attribution")
ROOTS = ("cli", "cluster")  # services.cli, services.cluster: the composition roots
GENERATED = ("_pb2.py", "_pb2_grpc.py")


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    line: int


def modules() -> dict[str, Path]:
    found = {}
    for top, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            if path.name.endswith(GENERATED):
                continue
            parts = [top, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _skips_type_checking(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except those under `if TYPE_CHECKING:` (annotations only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def imports_of(name: str, path: Path, known: dict[str, Path]) -> Iterator[Import]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in _skips_type_checking(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from pkg import module` imports the module; `from module import name` the module.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield Import(name, target, node.lineno)


def area(module: str) -> str:
    """`services.gateway.relay` → `gateway`; `openlora.sync` → `openlora`; `services.cli` → `cli`."""
    parts = module.split(".")
    if parts[0] == "openlora":
        return "openlora"
    return parts[1] if len(parts) > 1 else parts[0]


def allowed(source: str, target: str) -> bool:
    a, b = area(source), area(target)
    if a == b or a in ROOTS:
        return True
    if a == "openlora":
        return False
    return b in ("common", "openlora")  # a service package, services.common or the empty `services`


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(edges):
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def check() -> tuple[dict[tuple[str, str], int], list[Import], list[list[str]]]:
    """(package edges with their import counts, forbidden imports, circles)."""
    known = modules()
    edges: dict[str, set[str]] = defaultdict(set)
    packages: dict[tuple[str, str], int] = defaultdict(int)
    forbidden = []
    for name, path in known.items():
        for found in imports_of(name, path, known):
            edges[name].add(found.target)
            if area(name) != area(found.target):
                packages[(area(name), area(found.target))] += 1
            if not allowed(name, found.target):
                forbidden.append(found)
    return dict(packages), forbidden, circles(edges)


def main() -> int:
    packages, forbidden, loops = check()
    print("package imports (count of importing statements):")
    for (a, b), count in sorted(packages.items()):
        print(f"  {a:>13} -> {b:<13} {count:>4}")
    for bad in forbidden:
        print(f"forbidden: {bad.source} (line {bad.line}) imports {bad.target}", file=sys.stderr)
    for loop in loops:
        print(f"circle: {' <-> '.join(loop)}", file=sys.stderr)
    if forbidden or loops:
        return 1
    print("no circles, no cross-service imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
