"""A certificate authority of one machine's cluster: what `openlora up --tls` runs every hop with.

One CA, one server certificate for `localhost` / 127.0.0.1 that every local service presents, and one
client certificate per role whose common name is the role (`roles.Role`), which is how a mutual-TLS
server knows who calls. EC P-256 keys, written owner-only. For a real deployment use your own CA
(cert-manager, a Vault PKI): the services only need PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.trust.roles import Role

ROLE_NAMES = tuple(role.value for role in Role)


@dataclass(frozen=True)
class LocalPKI:
    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def client(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of the client certificate whose common name is `name` (a role)."""
        return self.directory / f"client-{name}.pem", self.directory / f"client-{name}.key"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)


def make_local_pki(
    directory: Path, *, clients: tuple[str, ...] = ROLE_NAMES, valid_days: int = 30
) -> LocalPKI:
    """A fresh CA in `directory` with the server certificate and one client certificate per name."""
    directory.mkdir(parents=True, exist_ok=True)
    pki = LocalPKI(directory)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder(
            subject_name=_name("openlora-local-ca"),
            issuer_name=_name("openlora-local-ca"),
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=not_before,
            not_valid_after=not_after,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common_name: str, usage: x509.ObjectIdentifier, cert_path: Path, key_path: Path) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder(
                subject_name=_name(common_name),
                issuer_name=ca_cert.subject,
                public_key=key.public_key(),
                serial_number=x509.random_serial_number(),
                not_valid_before=not_before,
                not_valid_after=not_after,
            )
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)

    pki.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, pki.server_cert, pki.server_key)
    for name in clients:
        leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, *pki.client(name))
    return pki
