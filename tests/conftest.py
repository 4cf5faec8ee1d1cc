"""Fixtures shared by the whole suite: the tiny model, a real S3 server, a fresh PostgreSQL database."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.cluster.tiny_models import FAMILIES, Family, build_tiny_model
from tests.kit import work_timeout
from tests.kit.postgres import create_database, drop_database
from tests.kit.seaweedfs import S3Endpoint, SeaweedFS
from tests.kit.service_auth import install as install_service_secret

# Before any settings are read: every service the suite starts checks its callers, as in production.
install_service_secret()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the engine's CPU kernels once, first: the engine processes tests start then load them,
    rather than the first of them compiling them inside a test's time limit."""
    from services.inference.engine.cpu_kernels import KernelUnavailable, library

    with contextlib.suppress(KernelUnavailable):  # their own tests fail and say why; engines fall back
        library()


@pytest.hookimpl(tryfirst=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> bool | None:
    """Each test's time limit counts uncontended time: a busy neighbour does not fail it."""
    return work_timeout.start(item, settings)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Family], Path]:
    """Builds each tiny model family once per test run and returns its folder."""
    built: dict[str, Path] = {}

    def get(family: Family = "llama") -> Path:
        if family not in FAMILIES:
            raise ValueError(family)
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(f"tiny-{family}"), family=family)
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory: Callable[[Family], Path]) -> Path:
    """Folder of the tiny random Llama and its byte-level BPE tokenizer."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, prepared once per machine in the user cache."""
    from services.common.smollm2 import prepare_smollm2

    return prepare_smollm2()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Endpoint]:
    """A real SeaweedFS S3 server on loopback, for the whole test run."""
    with SeaweedFS() as endpoint:
        yield endpoint


@pytest.fixture
def s3_bucket(s3_server: S3Endpoint, request: pytest.FixtureRequest) -> Iterator[tuple[Any, str]]:
    """An empty bucket of its own for one test, emptied and removed after it: (client, bucket name)."""
    import uuid

    client = s3_server.client()
    name = f"test-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    yield client, name
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=name):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=name, Key=obj["Key"])
    client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str]:
    """SQLAlchemy URL of a fresh PostgreSQL database for this test run; dropped afterwards."""
    url = create_database()
    yield url
    drop_database(url)
