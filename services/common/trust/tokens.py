"""Service tokens: a caller's role, signed with the cluster's shared secret, for a few minutes.

A token reads `olst1.<role>.<audience>.<expires>.<signature>`: the caller's role, the component it
may be presented to, a Unix expiry time, and HMAC-SHA256 over the first four fields with the shared
secret (hex). The audience stops a token a service received from being replayed to another one; the
short expiry bounds how long a token seen on the wire stays useful. Without TLS a token can still be
read by anyone on the path, which is why mutual TLS is the production mode.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from pathlib import Path

from services.common.errors import Unauthenticated
from services.common.trust.roles import Role

TOKEN_METADATA_KEY = "x-openlora-service-token"
_VERSION = "olst1"
MIN_SECRET_BYTES = 32
DEFAULT_LIFETIME_S = 300.0
# Tolerated difference between two hosts' clocks, in both directions.
CLOCK_SKEW_S = 30.0


def new_secret() -> str:
    """A fresh cluster secret: 384 random bits, URL-safe, for a file or a Kubernetes Secret."""
    return secrets.token_urlsafe(48)


def load_secret(path: Path) -> bytes:
    """The secret in `path` (surrounding whitespace ignored, as editors and `kubectl` add newlines)."""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the service secret {path}: {exc.strerror or exc}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the service secret in {path} has {len(secret)} bytes; at least {MIN_SECRET_BYTES} are "
            "needed (make one with `openlora secret new`)"
        )
    return secret


def _sign(secret: bytes, payload: str) -> str:
    return hmac.digest(secret, payload.encode(), hashlib.sha256).hex()


class TokenMinter:
    """Makes this service's tokens, one per audience, renewed when half their lifetime is gone."""

    def __init__(
        self,
        secret: bytes,
        role: Role,
        *,
        lifetime_s: float = DEFAULT_LIFETIME_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret
        self.role = role
        self.lifetime_s = lifetime_s
        self.clock = clock
        self._cached: dict[str, tuple[float, str]] = {}  # audience → (renew after, token)

    def token(self, audience: str) -> str:
        now = self.clock()
        cached = self._cached.get(audience)
        if cached is not None and now < cached[0]:
            return cached[1]
        expires = int(now + self.lifetime_s)
        payload = f"{_VERSION}.{self.role.value}.{audience}.{expires}"
        token = f"{payload}.{_sign(self.secret, payload)}"
        self._cached[audience] = (now + self.lifetime_s / 2, token)
        return token


class TokenVerifier:
    """Checks tokens presented to one component and says whose role they carry."""

    def __init__(
        self,
        secret: bytes,
        audience: str,
        *,
        max_lifetime_s: float = DEFAULT_LIFETIME_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secret = secret
        self.audience = audience
        self.max_lifetime_s = max_lifetime_s
        self.clock = clock

    def role(self, token: str) -> Role:
        """The token's role; Unauthenticated saying why when it is not a valid token for this component."""
        payload, _, signature = token.rpartition(".")
        fields = payload.split(".")
        if len(fields) != 4 or fields[0] != _VERSION:
            raise Unauthenticated("malformed service token")
        if not hmac.compare_digest(signature, _sign(self.secret, payload)):
            raise Unauthenticated("service token signature does not verify (another cluster's secret?)")
        _, role, audience, expires = fields
        if audience != self.audience:
            raise Unauthenticated(f"service token is for {audience!r}, not {self.audience!r}")
        try:
            expiry = int(expires)
        except ValueError:
            raise Unauthenticated("malformed service token") from None
        now = self.clock()
        if expiry + CLOCK_SKEW_S < now:
            raise Unauthenticated("service token has expired (are the two hosts' clocks in step?)")
        if expiry - now > self.max_lifetime_s + CLOCK_SKEW_S:
            raise Unauthenticated(
                f"service token lives past the {self.max_lifetime_s:.0f}s allowed "
                "(are the two hosts' clocks in step?)"
            )
        try:
            return Role(role)
        except ValueError:
            raise Unauthenticated(f"service token names an unknown role {role!r}") from None
