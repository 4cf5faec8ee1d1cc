"""Throwaway certificate authority, server and client certificates for TLS/mTLS tests (the local CA
`openlora up --tls` makes, with a client named for no role besides)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.trust.local_ca import make_local_pki
from services.common.trust.roles import Role

# Client certificates named for each service role (the role is the common name), and one naming none.
ROLE_CLIENTS = (*(r.value for r in Role), "stranger")


@dataclass(frozen=True)
class CertFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def role(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of the client certificate whose common name is `name` (`ROLE_CLIENTS`)."""
        return self.ca.parent / f"client-{name}.pem", self.ca.parent / f"client-{name}.key"


def make_certs(directory: Path) -> CertFiles:
    pki = make_local_pki(directory, clients=(*ROLE_CLIENTS, "openlora-client"), valid_days=1)
    return CertFiles(pki.ca, pki.server_cert, pki.server_key, *pki.client("openlora-client"))
