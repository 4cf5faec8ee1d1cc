"""How many threads the engine gets, and how they wait, when the settings leave it to the worker: a
large model's engine takes every core and spins briefly between operators; a small model's leaves one
core to the front and sleeps at once (measured in `bench/RESULTS.md`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.inference.app import (
    ALL_CORES_SPIN_COUNT,
    LARGE_MODEL_BYTES,
    default_engine_threads,
    engine_environment,
)
from services.inference.settings import WorkerSettings


def _model(folder: Path, weights: int) -> Path:
    folder.mkdir()
    with (folder / "model.safetensors").open("wb") as f:
        f.truncate(weights)  # sparse: only the size is read
    return folder


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})


@pytest.mark.usefixtures("four_cores")
def test_a_large_model_takes_every_core_and_a_small_one_leaves_the_front_one(tmp_path: Path) -> None:
    assert default_engine_threads(_model(tmp_path / "large", LARGE_MODEL_BYTES)) == 4
    assert default_engine_threads(_model(tmp_path / "small", LARGE_MODEL_BYTES - 1)) == 3


def test_a_single_core_is_the_engine_s_whatever_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert default_engine_threads(_model(tmp_path / "small", 1024)) == 1


@pytest.mark.usefixtures("four_cores")
def test_an_engine_with_every_core_spins_briefly_and_one_that_shares_sleeps_at_once() -> None:
    settings = WorkerSettings()
    assert engine_environment(settings, 4)["GOMP_SPINCOUNT"] == str(ALL_CORES_SPIN_COUNT)
    assert engine_environment(settings, 3)["GOMP_SPINCOUNT"] == "0"
    assert engine_environment(settings, 4)["OMP_WAIT_POLICY"] == "PASSIVE"


@pytest.mark.usefixtures("four_cores")
def test_the_wait_settings_win_over_the_defaults() -> None:
    spun = WorkerSettings(engine_omp_spin_count=7)
    assert engine_environment(spun, 3)["GOMP_SPINCOUNT"] == "7"
    active = engine_environment(WorkerSettings(engine_omp_wait_policy="active"), 4)
    assert active["OMP_WAIT_POLICY"] == "ACTIVE"
    assert active.get("GOMP_SPINCOUNT") == os.environ.get("GOMP_SPINCOUNT")  # libgomp's own
