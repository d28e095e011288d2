"""Certificates for a federation: a CA, a SuperLink TLS certificate and one auth key pair per site.

Everything is made with python `cryptography` (no openssl shell-outs):
- `ca.crt` / `ca.key`: a private certificate authority; give `ca.crt` to every site.
- `server.crt` / `server.key`: the SuperLink's TLS certificate for the given host names / IPs.
- `sites/<name>/auth.key` / `auth.pub`: the site's SuperNode authentication key pair
  (EC P-384, OpenSSH format as `flower-supernode --auth-supernode-private-key` and
  `flwr supernode register` expect). The private key stays at the site; the public key is
  registered with the SuperLink.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # browsers' and most TLS stacks' upper bound for server certificates
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class SiteKeys:
    """Where one site's authentication key pair was written."""

    name: str
    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class CertBundle:
    """Paths of everything `make_certs` wrote."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    sites: list[SiteKeys] = field(default_factory=list)

    def registration_commands(self, connection: str = "fedseg") -> list[str]:
        """The `flwr supernode register` line of every site (run on the coordinating side)."""
        return [f"flwr supernode register {s.public_key} {connection} --name {s.name}" for s in self.sites]


def make_certs(out_dir: str | Path, hosts: list[str], sites: list[str], days: int = VALID_DAYS) -> CertBundle:
    """Write a CA, a server certificate valid for `hosts`, and an auth key pair per site."""
    if not hosts:
        raise ValueError("give at least one host name or IP address for the server certificate")
    for name in sites:
        if not _SITE_NAME.match(name):
            raise ValueError(f"site name '{name}' must be 1-63 letters, digits, '.', '_' or '-'")
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names must be unique, got {sites}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, days)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = _server_certificate(server_key.public_key(), hosts, ca_key, ca_cert, days)
    return CertBundle(
        ca_cert=_write(out / "ca.crt", ca_cert.public_bytes(serialization.Encoding.PEM)),
        ca_key=_write(out / "ca.key", _pem_private(ca_key), private=True),
        server_cert=_write(out / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM)),
        server_key=_write(out / "server.key", _pem_private(server_key), private=True),
        sites=[_site_keys(out / "sites" / name, name) for name in sites],
    )


def make_site_keys(site_dir: str | Path, name: str) -> SiteKeys:
    """One site's SuperNode auth key pair (a site may also make its own and send only auth.pub)."""
    return _site_keys(Path(site_dir), name)


def _site_keys(site_dir: Path, name: str) -> SiteKeys:
    site_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return SiteKeys(
        name=name,
        private_key=_write(site_dir / "auth.key", private, private=True),
        public_key=_write(site_dir / "auth.pub", public + f" {name}\n".encode()),
    )


def _ca_certificate(key: ec.EllipticCurvePrivateKey, days: int) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedseg federation CA")])
    return (
        _builder(name, name, key.public_key(), days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )


def _server_certificate(
    public_key: ec.EllipticCurvePublicKey,
    hosts: list[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    days: int,
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    return (
        _builder(subject, ca_cert.subject, public_key, days)
        .add_extension(x509.SubjectAlternativeName([_general_name(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    """Write bytes; private keys are created readable by the owner only (0600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    if private:
        os.chmod(path, 0o600)
    return path
