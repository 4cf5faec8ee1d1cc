"""Who is calling: the `authorization: Bearer <key>` metadata, checked against the key ring."""

from __future__ import annotations

from typing import Any

from services.common.errors import Unauthenticated
from services.gateway.keys import KeyEntry, KeySource

_BEARER = "bearer "


def bearer_token(metadata: Any) -> str:
    """The API key a call carries; Unauthenticated when there is none."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            if value[: len(_BEARER)].lower() != _BEARER or not value[len(_BEARER) :].strip():
                raise Unauthenticated("authorization metadata must be 'Bearer <API key>'")
            return value[len(_BEARER) :].strip()
    raise Unauthenticated("no API key: send the metadata 'authorization: Bearer <API key>'")


class Authenticator:
    def __init__(self, keys: KeySource) -> None:
        self.keys = keys

    def __call__(self, context: Any) -> KeyEntry:
        """The caller's key entry; Unauthenticated (no or unknown key) or PermissionDenied (revoked)."""
        return self.keys.authenticate(bearer_token(context.invocation_metadata()))
