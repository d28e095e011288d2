"""Can the SuperLink's certificate serve the addresses `fedseg server` prints and its SuperExec dials?

Checked before anything starts, each fault one line (CertError): the certificate and key files
parse and belong together, the certificate is within its validity period and chains to `ca.crt`,
and it names the host of the printed connection (what `flwr` and the sites dial) and the host the
SuperLink's own SuperExec dials on this machine. That local host is chosen here among the
certificate's names: loopback names first (`fedseg certs` always adds `localhost`), else a name
that leads to an address the SuperLink listens on.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from fedseg.deploy.certs import CertError

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ServerCertificate:
    """The names, validity period and issuer of a TLS server certificate."""

    path: Path
    cert: x509.Certificate

    @classmethod
    def load(cls, path: str | Path) -> ServerCertificate:
        path = Path(path)
        try:
            return cls(path, x509.load_pem_x509_certificate(path.read_bytes()))
        except ValueError:
            raise CertError(f"{path}: not a PEM certificate") from None

    @classmethod
    def from_der(cls, data: bytes, source: str) -> ServerCertificate:
        """A certificate received over TLS (`source`: where it came from, for messages)."""
        return cls(Path(source), x509.load_der_x509_certificate(data))

    @property
    def names(self) -> list[str]:
        """DNS names and IP addresses of the subjectAltName, in order (the common name when it has none)."""
        try:
            san = self.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            common = self.cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
            return [str(common[0].value)] if common else []
        return [str(general.value) for general in san if isinstance(general, x509.DNSName | x509.IPAddress)]

    @property
    def issuer(self) -> str:
        return self.cert.issuer.rfc4514_string()

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def covers(self, host: str) -> bool:
        """Whether TLS clients verifying `host` accept this certificate's names (RFC 6125 matching:
        IPs exactly, DNS names case-insensitively, '*' only as a whole left-most label)."""
        wanted = _ip(host)
        for name in self.names:
            if wanted is not None or _ip(name) is not None:
                if wanted is not None and wanted == _ip(name):
                    return True
                continue
            if _dns_match(name.lower().rstrip("."), host.lower().rstrip(".")):
                return True
        return False

    def validity_fault(self, now: dt.datetime | None = None) -> str | None:
        """Why the certificate is not valid now (expired, not yet valid), or None."""
        now = now or dt.datetime.now(dt.UTC)
        if now > self.cert.not_valid_after_utc:
            return f"expired on {self.cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        if now < self.cert.not_valid_before_utc:
            return f"not valid before {self.cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        return None


def check_server_files(ca_cert: Path, server_cert: Path, server_key: Path, hosts: list[str]) -> ServerCertificate:
    """Refuse (CertError, one line) a certificate that cannot serve every host in `hosts`: unreadable,
    key of another certificate, outside its validity period, not issued by `ca_cert`, or lacking a name."""
    cert = ServerCertificate.load(server_cert)
    try:
        key = serialization.load_pem_private_key(server_key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise CertError(f"{server_key}: not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(*_SPKI) != cert.cert.public_key().public_bytes(*_SPKI):
        raise CertError(f"{server_key}: is not the key of {server_cert} (make both with `fedseg certs`)")
    fault = cert.validity_fault()
    if fault:
        raise CertError(f"{server_cert}: {fault}; make new certificates with `fedseg certs --force`")
    for host in hosts:
        if not cert.covers(host):
            raise CertError(
                f"{server_cert}: is valid for {', '.join(cert.names)}, not for '{host}' "
                f"(make it with `fedseg certs ... --host {host}`)"
            )
    chain_fault = chain_fault_of(cert, ca_cert, hosts[0])
    if chain_fault:
        raise CertError(f"{server_cert}: {chain_fault}")
    return cert


def chain_fault_of(cert: ServerCertificate, ca_cert: Path, host: str) -> str | None:
    """Why a TLS client holding only `ca_cert` would not accept `cert` for `host`, or None."""
    try:
        roots = x509.load_pem_x509_certificates(ca_cert.read_bytes())
    except ValueError:
        return f"{ca_cert} is not a PEM certificate"
    address = _ip(host)
    subject = x509.IPAddress(address) if address is not None else x509.DNSName(host)
    verifier = PolicyBuilder().store(Store(roots)).build_server_verifier(subject)
    try:
        verifier.verify(cert.cert, [])
    except VerificationError as err:
        return f"is not accepted by clients holding {ca_cert} ({err}); was it issued by this CA?"
    return None


def superexec_host(cert: ServerCertificate, bind_host: str) -> str:
    """The host name the SuperLink's own SuperExec dials: a name of `cert` that leads to an address the
    SuperLink listens on (`bind_host`), loopback names first. CertError when there is none."""
    ordered = [n for n in LOOPBACK_NAMES if n in cert.names] + [n for n in cert.names if n not in LOOPBACK_NAMES]
    listening = None if bind_host in WILDCARD_BINDS else set(_addresses(bind_host))
    for name in ordered:
        if "*" in name:
            continue
        found = _addresses(name)
        if listening is None and any(_is_local(address) for address in found):
            return name
        if listening is not None and listening & set(found):
            return name
    raise CertError(
        f"{cert.path}: none of its names ({', '.join(cert.names)}) leads to this machine's SuperLink "
        f"(listening on {bind_host or '0.0.0.0'}), so its own SuperExec cannot verify it; make it with "
        f"`fedseg certs` (which adds localhost)"
    )


def host_of(address: str) -> str:
    """'host' of 'host:port' or '[v6]:port'."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _dns_match(pattern: str, host: str) -> bool:
    if pattern == host:
        return True
    first, _, rest = pattern.partition(".")
    return first == "*" and bool(rest) and host.partition(".")[2] == rest and "." in host


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _addresses(host: str) -> list[str]:
    try:
        return sorted({str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)})
    except (socket.gaierror, UnicodeError):
        return []


def _is_local(address: str) -> bool:
    """Whether `address` belongs to this machine (it can be bound)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
