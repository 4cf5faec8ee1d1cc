"""The layout the README's module table describes is the one on disk: every service package has the
same three entry modules, and every folder the table names exists (and every package is named)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "inference", "adapter_store", "attribution")


def readme_table_paths() -> set[str]:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| folder | what lives there |") : text.index("## The API")]
    paths = set()
    for cell in re.findall(r"^\| `([^`]+)`(?:, `([^`]+)`)? \|", table, re.M):
        for path in filter(None, cell):
            if braces := re.fullmatch(r"(.*)\{([^}]+)\}(.*)", path):
                paths |= {f"{braces[1]}{part}{braces[3]}" for part in braces[2].split(",")}
            else:
                paths.add(path)
    return paths


@pytest.mark.parametrize("service", SERVICES)
def test_every_service_package_has_settings_app_and_cli(service: str) -> None:
    package = ROOT / "services" / service
    for module in ("settings.py", "app.py", "cli.py"):
        assert (package / module).is_file(), f"services/{service}/{module}"
    assert not (package / "server.py").exists() and not (package / "config.py").exists()
    source = (package / "app.py").read_text()
    assert re.search(r"^def build\(settings: \w+Settings", source, re.M), "app.py has build(settings)"
    assert re.search(r"^app = typer\.Typer\(", (package / "cli.py").read_text(), re.M)


def test_the_readme_table_names_what_exists_and_every_package() -> None:
    named = readme_table_paths()
    missing = [p for p in named if not (ROOT / p).exists()]
    assert not missing, f"the README names folders that do not exist: {missing}"
    packages = {f"services/{p.name}/" for p in (ROOT / "services").iterdir() if (p / "__init__.py").exists()}
    assert packages <= named, f"packages the README's table does not name: {packages - named}"
    assert "clients/python/" in named
