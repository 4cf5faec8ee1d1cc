"""The test session's cluster secret, and the service identities tests call the services with.

`install()` (run by the suite's conftest before anything else) makes one secret file and names it in
every service's `*_SERVICE_SECRET_FILE` variable, so the servers tests start, in process or as
child processes, are as closed as in production; a test then calls them as a role would:

    async with open_channel(address, **as_role(OPERATOR, "store")) as channel: ...
    async with open_channel(address, **trusted("attribution")) as channel: ...  # any allowed role
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path
from typing import Any

from services.common.trust.credentials import ServiceIdentity
from services.common.trust.roles import OPERATOR, Role, allowed_roles
from services.common.trust.setup import OPERATOR_SECRET_ENV, ensure_secret_file, secret_env


def install() -> Path:
    """The session's secret file, named in the environment every service reads (idempotent)."""
    existing = os.environ.get(OPERATOR_SECRET_ENV)
    if existing and Path(existing).is_file():
        path = Path(existing)
    else:
        path = ensure_secret_file(Path(tempfile.mkdtemp(prefix="openlora-test-secret-")) / "secret")
    os.environ.update(secret_env(path))
    return path


def secret_file() -> Path:
    return Path(os.environ[OPERATOR_SECRET_ENV])


def identity(role: Role) -> ServiceIdentity:
    return _identity(role, secret_file())


@functools.cache
def _identity(role: Role, path: Path) -> ServiceIdentity:
    return ServiceIdentity.from_secret_file(path, role)


def as_role(role: Role, audience: str) -> dict[str, Any]:
    """`open_channel` keywords presenting `role`'s token to `audience` (`worker`, `store`, `attribution`)."""
    return {"identity": identity(role), "audience": audience}


class TableCaller:
    """Calls each method as a role the table allows it for (an operator's where it may): for tests
    about what a service does, not about who may ask; the authorization matrix tests the rest."""

    def metadata(self, audience: str, method: str = "") -> tuple[str, str]:
        allowed = allowed_roles(audience, method)
        role = OPERATOR if OPERATOR in allowed or not allowed else min(allowed)
        return identity(role).metadata(audience)


def trusted(audience: str) -> dict[str, Any]:
    """`open_channel` keywords calling `audience` as whichever role each method allows."""
    return {"identity": TableCaller(), "audience": audience}
