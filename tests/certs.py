"""Test certificates for DICOM TLS, made with ``cryptography`` (no openssl CLI).

:func:`make_pki` writes, in PEM, into one folder:

* ``ca.pem`` / ``ca.key``: the CA the node trusts (``node.tls_ca``) and the
  clients trust for the server;
* ``server.pem`` / ``server.key``: the node's certificate, for ``localhost``
  and ``127.0.0.1`` (DNS and IP subject alternative names), signed by the CA;
* ``client.pem`` / ``client.key``: a client certificate signed by the CA;
* ``other-ca.pem`` and ``wrong-ca-client.pem`` / ``.key``: a client
  certificate signed by a different CA;
* ``expired-client.pem`` / ``.key``: a client certificate signed by the right
  CA whose validity ended yesterday.

RSA 2048 keys: DCMTK's BCP 195 profiles and OpenSSL's default security level
both accept them.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Pki:
    """Paths of everything :func:`make_pki` wrote."""

    root: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    wrong_ca_client_cert: Path
    wrong_ca_client_key: Path
    expired_client_cert: Path
    expired_client_key: Path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacs-ai tests"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _write_key(path: Path, key: rsa.RSAPrivateKey) -> Path:
    path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))
    path.chmod(0o600)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_ca(common_name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed CA certificate and its key."""
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _ONE_DAY)
        .not_valid_after(now + 30 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_leaf(
    common_name: str,
    ca_cert: x509.Certificate,
    ca_key: rsa.RSAPrivateKey,
    *,
    server: bool,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """An end-entity certificate signed by ``ca_cert``: a TLS server one
    (``localhost`` and ``127.0.0.1``) or a TLS client one."""
    key = _key()
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - _ONE_DAY)
        .not_valid_after(not_after or now + 30 * _ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


def make_pki(root: Path) -> Pki:
    """Write the CA, server and client certificates described above into ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = make_ca("pacs-ai test CA")
    other_cert, other_key = make_ca("pacs-ai other CA")
    server_cert, server_key = make_leaf("localhost", ca_cert, ca_key, server=True)
    client_cert, client_key = make_leaf("PACS_AI_TEST_SCU", ca_cert, ca_key, server=False)
    wrong_cert, wrong_key = make_leaf("WRONG_CA_SCU", other_cert, other_key, server=False)
    now = datetime.datetime.now(datetime.timezone.utc)
    expired_cert, expired_key = make_leaf(
        "EXPIRED_SCU", ca_cert, ca_key, server=False,
        not_before=now - 30 * _ONE_DAY, not_after=now - _ONE_DAY,
    )
    return Pki(
        root=root,
        ca_cert=_write_cert(root / "ca.pem", ca_cert),
        ca_key=_write_key(root / "ca.key", ca_key),
        server_cert=_write_cert(root / "server.pem", server_cert),
        server_key=_write_key(root / "server.key", server_key),
        client_cert=_write_cert(root / "client.pem", client_cert),
        client_key=_write_key(root / "client.key", client_key),
        other_ca_cert=_write_cert(root / "other-ca.pem", other_cert),
        wrong_ca_client_cert=_write_cert(root / "wrong-ca-client.pem", wrong_cert),
        wrong_ca_client_key=_write_key(root / "wrong-ca-client.key", wrong_key),
        expired_client_cert=_write_cert(root / "expired-client.pem", expired_cert),
        expired_client_key=_write_key(root / "expired-client.key", expired_key),
    )
