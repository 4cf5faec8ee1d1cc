"""Server side: who is calling, and may they call this method.

The caller's role comes from the client certificate when the server verified one (its common name
is the role), else from a service token in the call's metadata. The server kit's interceptor asks
`ServiceAuthorizer.authorize` before any handler runs and keeps the role in `caller_role`, where a
handler that must know (a worker believing a request's tenant) reads it.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.trust.roles import Role, allowed_roles
from services.common.trust.tokens import TOKEN_METADATA_KEY, TokenVerifier

#: The authenticated role of the call being served (None on open methods and unauthenticated servers).
caller_role: ContextVar[Role | None] = ContextVar("caller_role", default=None)


def certificate_role(context: Any) -> Role | None:
    """The role in a verified client certificate's common name; None without a client certificate."""
    auth = context.auth_context() or {}
    names = auth.get("x509_common_name")
    if not names:
        return None
    name = names[0].decode(errors="replace")
    try:
        return Role(name)
    except ValueError:
        raise PermissionDenied(
            f"client certificate common name {name!r} is not a role ({', '.join(r.value for r in Role)})"
        ) from None


def presented_token(metadata: Any) -> str | None:
    for key, value in metadata or ():
        if key == TOKEN_METADATA_KEY and isinstance(value, str):
            return value
    return None


class ServiceAuthorizer:
    """Enforces `roles.AUTHORIZATION` for one component (`worker`, `store`, `attribution`)."""

    def __init__(self, component: str, verifier: TokenVerifier | None, *, certificates: bool) -> None:
        self.component = component
        self.verifier = verifier
        self.certificates = certificates

    def identify(self, context: Any) -> Role:
        """The caller's role; Unauthenticated when it presented no valid credential."""
        if self.certificates:
            role = certificate_role(context)
            if role is not None:
                return role
        token = presented_token(context.invocation_metadata())
        if token is not None and self.verifier is not None:
            return self.verifier.role(token)
        how = " or ".join(
            what
            for what, on in (("a client certificate", self.certificates), ("a service token", self.verifier))
            if on
        )
        raise Unauthenticated(f"{self.component} serves this method to other services only: present {how}")

    def authorize(self, method: str, context: Any) -> Role:
        """The caller's role when it may call `method`; Unauthenticated or PermissionDenied otherwise."""
        role = self.identify(context)
        allowed = allowed_roles(self.component, method)
        if role not in allowed:
            who = ", ".join(sorted(r.value for r in allowed)) or "no role"
            raise PermissionDenied(
                f"role {role.value!r} may not call {method} on the {self.component} (only {who})"
            )
        return role
