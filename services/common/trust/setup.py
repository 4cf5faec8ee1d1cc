"""What a service's settings say about its identity: the authorizer it serves with, the identity it
calls with, and the operator's identity for command-line tools."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from services.common.settings import ServiceSettings
from services.common.trust.caller import ServiceAuthorizer
from services.common.trust.credentials import ServiceIdentity
from services.common.trust.roles import AUTHORIZATION, OPERATOR, ROLE_OF_COMPONENT
from services.common.trust.tokens import TokenVerifier, load_secret, new_secret

log = logging.getLogger("openlora.trust")

#: Where operator tools (the store's admin commands, `openlora up`'s own calls) find the secret.
OPERATOR_SECRET_ENV = "OPENLORA_SERVICE_SECRET_FILE"


SERVICE_ENV_PREFIXES = ("OPENLORA_STORE_", "OPENLORA_ATTRIBUTION_", "OPENLORA_WORKER_", "OPENLORA_GATEWAY_")


def secret_env(path: Path) -> dict[str, str]:
    """Environment naming `path` as the secret of every service and of operator tools, for a
    cluster of local processes (`openlora up`, benchmarks, tests)."""
    return {OPERATOR_SECRET_ENV: str(path)} | {
        f"{prefix}SERVICE_SECRET_FILE": str(path) for prefix in SERVICE_ENV_PREFIXES
    }


class NoServiceAuth(ValueError):
    """A service-authenticated component was configured with no way to tell its callers apart."""


def server_authorizer(settings: ServiceSettings, component: str) -> ServiceAuthorizer | None:
    """The authorizer `component`'s server enforces; None for the gateway (API keys) or with `open_rpcs`."""
    if component not in AUTHORIZATION:
        return None
    verifier = None
    if settings.service_secret_file is not None:
        verifier = TokenVerifier(load_secret(settings.service_secret_file), component)
    certificates = settings.tls_client_ca_file is not None
    if verifier is not None or certificates:
        return ServiceAuthorizer(component, verifier, certificates=certificates)
    if settings.open_rpcs:
        log.warning("%s serves every RPC to any caller (open_rpcs): development only", component)
        return None
    prefix = type(settings).model_config.get("env_prefix", "OPENLORA_")
    raise NoServiceAuth(
        f"the {component} cannot tell its callers apart: set {prefix}SERVICE_SECRET_FILE to the "
        f"cluster's secret (`openlora secret new` makes one), or mutual TLS ({prefix}TLS_CLIENT_CA_FILE); "
        f"{prefix}OPEN_RPCS=true serves any caller (development only)"
    )


def service_identity(settings: ServiceSettings, component: str) -> ServiceIdentity | None:
    """The identity `component` presents to the services it calls; None without a secret (mutual TLS
    or open services)."""
    if settings.service_secret_file is None:
        return None
    return ServiceIdentity.from_secret_file(settings.service_secret_file, ROLE_OF_COMPONENT[component])


def operator_identity(secret_file: Path | None = None) -> ServiceIdentity | None:
    """An operator's identity from `secret_file` or `$OPENLORA_SERVICE_SECRET_FILE`; None when neither."""
    path = secret_file or (
        Path(os.environ[OPERATOR_SECRET_ENV]) if os.environ.get(OPERATOR_SECRET_ENV) else None
    )
    return ServiceIdentity.from_secret_file(path, OPERATOR) if path is not None else None


def ensure_secret_file(path: Path) -> Path:
    """`path` holding a cluster secret: kept when it already holds a valid one, else made owner-only."""
    if path.exists():
        load_secret(path)  # ValueError when it is too short: never silently replace an operator's file
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(new_secret() + "\n")
    return path
