"""Certificates for a federation: a CA, a SuperLink TLS certificate and one auth key pair per site.

Everything is made with python `cryptography` (no openssl shell-outs):
- `ca.crt` / `ca.key`: a private certificate authority; give `ca.crt` to every site.
- `server.crt` / `server.key`: the SuperLink's TLS certificate for the given host names / IPs, and
  always for `localhost`: the SuperLink's own SuperExec dials it on its machine by that name.
- `sites/<name>/auth.key` / `auth.pub`: the site's SuperNode authentication key pair
  (EC P-384, OpenSSH format as `flower-supernode --auth-supernode-private-key` and
  `flwr supernode register` expect). The private key stays at the site; the public key is
  registered with the SuperLink.

Key files are written safely: every file is first written under a temporary name (keys 0600,
created exclusively, never through a link) and renamed into place only when all were written;
folders are created 0700; an existing file is replaced only with `force`, and a symbolic link at a
target (or at a folder under `out_dir`) is always refused, so a planted link cannot redirect a key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 825  # browsers' and most TLS stacks' upper bound for server certificates
LOCAL_NAME = "localhost"  # every server certificate names it: the SuperLink's own SuperExec dials it
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_NUMERIC_LABEL = re.compile(r"^(\d+|0[xX][0-9A-Fa-f]*)$")


class CertError(ValueError):
    """Certificates cannot be made or written; the message names the host, site or file."""


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


def make_certs(
    out_dir: str | Path, hosts: list[str], sites: list[str], days: int = VALID_DAYS, force: bool = False
) -> CertBundle:
    """Write a CA, a server certificate valid for `hosts` (and localhost), and an auth key pair per site; all files
    or none. Existing files are replaced only with `force`; links are refused (CertError)."""
    if not hosts:
        raise CertError("give at least one host name or IP address for the server certificate")
    for host in hosts:
        _check_host(host)
    for name in sites:
        if not _SITE_NAME.match(name):
            raise CertError(f"site name '{name}' must be 1-63 letters, digits, '.', '_' or '-'")
    if len(set(sites)) != len(sites):
        raise CertError(f"site names must be unique, got {sites}")
    if not 1 <= days <= VALID_DAYS:
        raise CertError(f"days must be 1 to {VALID_DAYS}, got {days}")
    out = Path(out_dir)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _ca_certificate(ca_key, days)
    server_key = ec.generate_private_key(ec.SECP384R1())
    names = hosts if LOCAL_NAME in hosts else [*hosts, LOCAL_NAME]
    server_cert = _server_certificate(server_key.public_key(), names, ca_key, ca_cert, days)
    files = {
        out / "ca.crt": (ca_cert.public_bytes(serialization.Encoding.PEM), False),
        out / "ca.key": (_pem_private(ca_key), True),
        out / "server.crt": (server_cert.public_bytes(serialization.Encoding.PEM), False),
        out / "server.key": (_pem_private(server_key), True),
    }
    keys = []
    for name in sites:
        site_keys, site_files = _site_key_files(out / "sites" / name, name)
        keys.append(site_keys)
        files.update(site_files)
    write_key_files(files, out, force)
    return CertBundle(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        sites=keys,
    )


def make_site_keys(site_dir: str | Path, name: str, force: bool = False) -> SiteKeys:
    """One site's SuperNode auth key pair (a site may also make its own and send only auth.pub)."""
    if not _SITE_NAME.match(name):
        raise CertError(f"site name '{name}' must be 1-63 letters, digits, '.', '_' or '-'")
    keys, files = _site_key_files(Path(site_dir), name)
    write_key_files(files, Path(site_dir), force)
    return keys


def _site_key_files(site_dir: Path, name: str) -> tuple[SiteKeys, dict[Path, tuple[bytes, bool]]]:
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    keys = SiteKeys(name=name, private_key=site_dir / "auth.key", public_key=site_dir / "auth.pub")
    return keys, {keys.private_key: (private, True), keys.public_key: (public + f" {name}\n".encode(), False)}


def _check_host(host: str) -> None:
    """An address a site can dial: an IP address (not unspecified, broadcast, multicast or IPv6 link-local,
    also written IPv4-mapped) or a DNS name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        _check_dns_name(host)
        return
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise CertError(f"host {host!r} has a zone (%{address.scope_id}), which a certificate cannot hold")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    kind = _undialable(address)
    if kind:
        raise CertError(f"host {host!r} is {kind} address, not one a site can dial; give the server's own address")


def _undialable(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """What kind of address no site can dial `address` is, or ""."""
    if address.is_unspecified:
        return "the listen-on-all"
    if address.is_multicast:
        return "a multicast"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast"
    if isinstance(address, ipaddress.IPv6Address) and address.is_link_local:
        return "an IPv6 link-local"
    return ""


def _check_dns_name(host: str) -> None:
    """Letters, digits and '-' in dot-separated labels, the last not a number (decimal or 0x hex: resolvers
    read such names as IPv4 addresses); '*' only as the whole first label of a name with at least two more.
    Public suffixes (a wildcard over co.uk) are not checked."""
    labels = host.split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        raise CertError(f"host {host!r} looks like an IPv4 address but is not one")
    if labels[0] == "*":
        if len(labels) < 3:
            raise CertError(f"host {host!r}: a wildcard needs at least two labels after '*' (as in *.example.org)")
        labels = labels[1:]
    if not (0 < len(host) <= 253 and all(_HOST_LABEL.match(label) for label in labels)):
        raise CertError(f"host {host!r} is neither an IP address nor a DNS name (letters, digits, '-', dots)")


def write_key_files(files: dict[Path, tuple[bytes, bool]], root: Path, force: bool = False) -> None:
    """Write {path: (bytes, private)} all or nothing: refuse links (at a target or a folder between
    `root` and it) and, without `force`, existing files; create folders 0700, private files 0600."""
    for path in files:
        for folder in [path.parent, *path.parent.parents]:
            if folder == root.parent or folder == folder.parent:
                break
            if folder != root and folder.is_symlink():
                raise CertError(f"{folder}: is a symbolic link; refusing to write keys through it")
            if folder.exists() and not folder.is_dir():
                raise CertError(f"{folder}: exists and is not a folder")
        if path.is_symlink():
            raise CertError(f"{path}: is a symbolic link; refusing to write through it (remove it first)")
        if path.exists() and not force:
            raise CertError(f"{path}: exists; refusing to replace it (give --force to make new keys)")
        if path.exists() and not path.is_file():
            raise CertError(f"{path}: exists and is not a regular file")
    written: list[tuple[Path, Path]] = []
    try:
        for path, (data, private) in files.items():
            _make_folders(path.parent)
            written.append((_write_temporary(path, data, private), path))
        for tmp, path in written:
            os.replace(tmp, path)  # replaces a file (never follows a link: the name itself is replaced)
    except OSError as err:
        raise CertError(f"{err.filename or root}: cannot write: {err.strerror or err}") from None
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)


def _make_folders(folder: Path) -> None:
    """Create `folder` and missing parents with mode 0700 (the umask cannot widen it)."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(mode=0o700)
        os.chmod(path, 0o700)


def _write_temporary(path: Path, data: bytes, private: bool) -> Path:
    """`data` in a new file beside `path` (exclusive, no link followed; 0600 or 0644), synced to disk."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600 if private else 0o644)
    try:
        os.fchmod(fd, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


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
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, days: int
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
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
