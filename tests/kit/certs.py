"""Throwaway certificate authority, server and client certificates for TLS/mTLS tests."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Client certificates named for each service role (the role is the common name), and one naming none.
ROLE_CLIENTS = ("gateway", "worker", "attribution", "operator", "stranger")


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


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def make_certs(directory: Path) -> CertFiles:
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder(
            subject_name=_name("openlora-test-ca"),
            issuer_name=_name("openlora-test-ca"),
            public_key=ca_key.public_key(),
            serial_number=x509.random_serial_number(),
            not_valid_before=not_before,
            not_valid_after=not_after,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(
        common_name: str, usage: x509.ObjectIdentifier
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
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
        return cert, key

    files = CertFiles(
        *(directory / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key"))
    )
    files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for (cert, key), cert_path, key_path in (
        (leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH), files.server_cert, files.server_key),
        (leaf("openlora-client", ExtendedKeyUsageOID.CLIENT_AUTH), files.client_cert, files.client_key),
        *((leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH), *files.role(name)) for name in ROLE_CLIENTS),
    ):
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(key, key_path)
    return files
