"""The README's first command, as a newcomer runs it (tiny model: seconds instead of minutes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
OPENLORA = Path(sys.executable).with_name("openlora")


def test_the_demo_runs_end_to_end_and_the_ledger_matches(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(OPENLORA), "demo", "--model", "tiny", "--keep", str(tmp_path / "cluster")],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    out = done.stdout
    for name in ("poet", "coder", "chef", "tutor"):
        assert f"[demo/{name}] " in out
    assert "[poet+chef] " in out
    assert "streamed: all there" in out
    for contributor in ("ana", "ocean-verse-corpus", "bo", "snippets-db", "chen", "dara"):
        assert f"\n      {contributor} " in out
    assert "demo finished" in out
