"""Can this machine reach the SuperLink at HOST:PORT, and does its TLS certificate verify for HOST?

One verdict line per step (name resolution, TCP connection, TLS handshake with the federation's
`ca.crt`); the first failing step ends the probe with the reason: no such name, nothing listening,
no answer (a firewall), or a certificate that is expired, names other hosts, or comes from another
CA than `ca.crt` (its issuer, names and dates are read from the certificate the SuperLink sent).
`fedseg site check --superlink` prints these lines; `fedseg server` runs the probe on its own
SuperLink before it starts the SuperExec.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from fedseg.deploy.server_tls import ServerCertificate, host_of


@dataclass
class Probe:
    """The verdict lines of one probe; `ok` when every step passed."""

    address: str
    lines: list[str] = field(default_factory=list)
    ok: bool = True

    def passed(self, text: str) -> None:
        self.lines.append(f"superlink {self.address}: {text}")

    def failed(self, text: str) -> Probe:
        self.lines.append(f"superlink {self.address}: {text}")
        self.ok = False
        return self


def probe_superlink(address: str, ca_cert: str | Path, timeout: float = 10.0) -> Probe:
    """Resolve, connect to and TLS-verify the SuperLink at `address` ('host:port') with `ca_cert`."""
    probe = Probe(address)
    host, port = host_of(address), _port_of(address)
    if port is None:
        return probe.failed("not HOST:PORT (e.g. server.example.org:9092)")
    try:
        found = sorted({str(info[4][0]) for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)})
    except (socket.gaierror, UnicodeError) as err:
        return probe.failed(f"cannot resolve '{host}' ({getattr(err, 'strerror', None) or err}): check the name")
    probe.passed(f"'{host}' resolves to {', '.join(found)}")
    started = time.perf_counter()
    try:
        raw = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return probe.failed("connection refused: nothing listens on that port (is the SuperLink running?)")
    except TimeoutError:
        return probe.failed(f"no answer within {timeout:g} s (a firewall dropping the traffic, or a wrong port?)")
    except OSError as err:
        return probe.failed(f"not reachable: {err.strerror or err}")
    probe.passed(f"reachable (TCP connection in {1000 * (time.perf_counter() - started):.0f} ms)")
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
    except (OSError, ssl.SSLError) as err:
        raw.close()
        return probe.failed(f"{ca_cert}: cannot be read as a CA certificate ({getattr(err, 'strerror', None) or err})")
    try:
        with context.wrap_socket(raw, server_hostname=host) as tls:
            cert = ServerCertificate.from_der(tls.getpeercert(binary_form=True) or b"", f"{host}:{port}")
    except ssl.SSLCertVerificationError as err:
        return probe.failed(_verification_fault(host, port, Path(ca_cert), err, timeout))
    except (ssl.SSLError, OSError) as err:
        return probe.failed(
            f"TLS handshake failed ({getattr(err, 'reason', None) or err}): is it a TLS SuperLink "
            "(not started with --insecure), and is this its port?"
        )
    probe.passed(
        f"TLS verified with {Path(ca_cert).name} (certificate for {', '.join(cert.names)}, "
        f"valid until {cert.not_after:%Y-%m-%d})"
    )
    return probe


def _verification_fault(host: str, port: int, ca_cert: Path, err: ssl.SSLCertVerificationError, timeout: float) -> str:
    """Why the certificate did not verify, from the certificate itself: wrong CA, expired, wrong name."""
    cert = _peer_certificate(host, port, timeout)
    if cert is not None:
        if not _issued_by_any(cert, ca_cert):
            same_name = (
                " (another CA of that name: a ca.crt of an older `fedseg certs`?)"
                if _names_issuer(cert, ca_cert)
                else ""
            )
            return (
                f"TLS: wrong CA: the SuperLink's certificate was issued by '{cert.issuer}', which {ca_cert.name} "
                f"does not hold{same_name}; get the federation's current ca.crt from the coordinator"
            )
        fault = cert.validity_fault()
        if fault:
            return f"TLS: the SuperLink's certificate {fault} (the coordinator must make new certificates)"
        if not cert.covers(host):
            return (
                f"TLS: wrong name: the SuperLink's certificate is valid for {', '.join(cert.names)}, not for "
                f"'{host}' (dial one of those names, or the coordinator reissues it with --host {host})"
            )
    return f"TLS: the SuperLink's certificate does not verify: {err.verify_message or err}"


def _peer_certificate(host: str, port: int, timeout: float) -> ServerCertificate | None:
    """The certificate the SuperLink presents, read without verifying it (only to explain a failure)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        return ServerCertificate.from_der(der, f"{host}:{port}") if der else None
    except (OSError, ssl.SSLError, ValueError):
        return None


def _roots(ca_cert: Path) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(ca_cert.read_bytes())
    except (OSError, ValueError):
        return []


def _names_issuer(cert: ServerCertificate, ca_cert: Path) -> bool:
    return any(root.subject == cert.cert.issuer for root in _roots(ca_cert))


def _issued_by_any(cert: ServerCertificate, ca_cert: Path) -> bool:
    for root in _roots(ca_cert):
        try:
            cert.cert.verify_directly_issued_by(root)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def _port_of(address: str) -> int | None:
    _, _, port = address.rpartition(":")
    return int(port) if port.isdigit() and 0 < int(port) < 65536 and ":" in address else None
