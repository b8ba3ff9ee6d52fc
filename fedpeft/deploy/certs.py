"""Credentials for a TLS-secured, node-authenticated Flower federation, made with ``cryptography``.

``OUT_DIR`` after :func:`write_credentials`::

    ca.crt  ca.key            the federation's certificate authority (keep ca.key offline)
    server.crt  server.key    the SuperLink's certificate (SANs: its hostnames / IPs), signed by the CA
    nodes/<site>.key          a site's SuperNode authentication key: EC P-384, OpenSSH private format
    nodes/<site>.pub          its public key, one OpenSSH line, for ``flwr supernode register``

These are the formats Flower 1.39 expects: one PEM certificate with server-auth usage covers the
Fleet, Control and Runtime APIs; SuperNode keys must be elliptic-curve keys on a NIST curve in
OpenSSH format without a passphrase (PEM public keys are refused). Private keys are written 0600.
Every file is written atomically; an existing key is never replaced unless ``force``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedpeft.errors import FedPeftError

NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_SANS = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class Credentials:
    """Where :func:`write_credentials` put everything (absolute paths)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    node_keys: dict[str, Path]  # site → private key (OpenSSH)
    node_public_keys: dict[str, Path]  # site → public key (one OpenSSH line)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_ca(common_name: str = "fedpeft federation CA", *, days: int = 3650) -> tuple[bytes, bytes]:
    """A self-signed CA: ``(certificate PEM, private key PEM)``."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def _san(entry: str) -> Any:
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9*]([A-Za-z0-9.-]*[A-Za-z0-9])?", entry):
            raise FedPeftError(f"--san {entry!r} is neither an IP address nor a host name") from None
        return x509.DNSName(entry)


def make_server_cert(
    ca_cert_pem: bytes, ca_key_pem: bytes, sans: Sequence[str], *, days: int = 825
) -> tuple[bytes, bytes]:
    """The SuperLink's certificate for ``sans`` (host names / IPs), signed by the CA: ``(cert PEM, key PEM)``."""
    if not sans:
        raise FedPeftError("the SuperLink certificate needs at least one --san (host name or IP)")
    ca_cert = x509.load_pem_x509_certificate(ca_cert_pem)
    ca_key = serialization.load_pem_private_key(ca_key_pem, password=None)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, sans[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(s) for s in sans]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_node_key() -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair: ``(OpenSSH private key, OpenSSH public line)`` on P-384."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Write ``data`` to ``path`` atomically, with mode 0600 for private keys (set before the rename)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600 if private else 0o644)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_credentials(
    out_dir: str | Path, *, sans: Sequence[str] = DEFAULT_SANS, nodes: Sequence[str] = (), force: bool = False
) -> Credentials:
    """Make the CA and SuperLink certificate (when ``out_dir`` has none yet) and a key pair per node.

    An existing CA is reused to sign a new server certificate only with ``force``; an existing node key
    is replaced only with ``force``. Nothing is written unless everything can be.

    Raises
    ------
    FedPeftError
        A bad node name or SAN, a duplicate node, or files that exist (without ``force``).
    """
    out = Path(out_dir).expanduser().resolve()
    for name in nodes:
        if not NODE_NAME.match(name):
            raise FedPeftError(f"node name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    if len(set(nodes)) != len(nodes):
        raise FedPeftError("each --node name must be given once")
    ca_cert, ca_key = out / "ca.crt", out / "ca.key"
    server_cert, server_key = out / "server.crt", out / "server.key"
    node_keys = {n: out / "nodes" / f"{n}.key" for n in nodes}
    node_pubs = {n: out / "nodes" / f"{n}.pub" for n in nodes}
    have_ca = ca_cert.exists() and ca_key.exists()
    make_link = force or not (server_cert.exists() and server_key.exists())
    planned = ([] if have_ca else [ca_cert, ca_key]) + ([server_cert, server_key] if make_link else [])
    planned += [*node_keys.values(), *node_pubs.values()]
    if ca_cert.exists() != ca_key.exists():
        raise FedPeftError(f"{out} holds only half of a CA (ca.crt / ca.key); restore it or start a new directory")
    if make_link:
        if not sans:
            raise FedPeftError("the SuperLink certificate needs at least one --san (host name or IP)")
        for entry in sans:
            _san(entry)  # raises for a bad one, before anything is written
    existing = [p for p in planned if p.exists()]
    if existing and not force:
        listed = ", ".join(str(p.relative_to(out)) for p in existing)
        raise FedPeftError(f"{listed} already exist in {out}; pass --force to replace them")

    out.mkdir(parents=True, exist_ok=True)
    (out / "nodes").mkdir(exist_ok=True)
    if have_ca:
        ca_pem, ca_key_pem = ca_cert.read_bytes(), ca_key.read_bytes()
    else:
        ca_pem, ca_key_pem = make_ca()
        _write(ca_key, ca_key_pem, private=True)
        _write(ca_cert, ca_pem, private=False)
    if make_link:
        cert_pem, key_pem = make_server_cert(ca_pem, ca_key_pem, list(sans))
        _write(server_key, key_pem, private=True)
        _write(server_cert, cert_pem, private=False)
    for name in nodes:
        private, public = make_node_key()
        _write(node_keys[name], private, private=True)
        _write(node_pubs[name], public, private=False)
    return Credentials(ca_cert, ca_key, server_cert, server_key, node_keys, node_pubs)
