"""The import rules hold for the real tree, and the checker does catch what it claims to."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools import import_graph


def test_no_circles_and_no_cross_service_imports() -> None:
    packages, forbidden, loops = import_graph.check()
    assert not forbidden, [f"{f.source}:{f.line} -> {f.target}" for f in forbidden]
    assert not loops
    assert ("inference", "openlora") in packages  # the graph is really walked
    assert not any(b == "services" or (a == "openlora" and b != "openlora") for a, b in packages)


def _tree(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return {"services": root / "services", "openlora": root / "openlora"}


def test_the_checker_finds_a_circle_a_cross_service_import_and_a_client_reaching_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sources = _tree(
        tmp_path,
        {
            "services/__init__.py": "",
            "services/common/__init__.py": "",
            "services/common/a.py": "def f():\n    from services.common import b\n",  # lazy: still a circle
            "services/common/b.py": "from services.common.a import f\n",
            "services/gateway/__init__.py": "",
            "services/gateway/app.py": "from services.inference.app import WorkerApp\n",
            "services/inference/__init__.py": "",
            "services/inference/app.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
            "    from services.gateway import app\n",  # types only: not a circle
            "openlora/__init__.py": "from services.common import a\n",
        },
    )
    monkeypatch.setattr(import_graph, "SOURCES", sources)
    _, forbidden, loops = import_graph.check()
    assert {(f.source, f.target) for f in forbidden} == {
        ("services.gateway.app", "services.inference.app"),
        ("openlora", "services.common.a"),
    }
    assert loops == [["services.common.a", "services.common.b"]]
