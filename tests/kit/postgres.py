"""A fresh PostgreSQL database per test run on the server at 127.0.0.1:5432 (trust auth).

`OPENLORA_TEST_PG_ADMIN_URL` points elsewhere (default `postgresql://postgres@127.0.0.1:5432/postgres`).
The database is dropped at the end, connections and all.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

ADMIN_URL = os.environ.get("OPENLORA_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


class PostgresUnavailable(RuntimeError):
    pass


def _connect_admin() -> Any:
    import psycopg

    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        raise PostgresUnavailable(
            f"cannot reach PostgreSQL at {ADMIN_URL}: {exc}\n"
            "start it with: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
        ) from exc


def create_database(prefix: str = "openlora_test") -> str:
    """Create an empty database; return its SQLAlchemy URL (psycopg 3 driver)."""
    name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _connect_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    with _connect_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
