"""Host names and certificates: `fedseg server` refuses a certificate that cannot serve its addresses;
`fedseg site check --superlink` says whether the SuperLink is reachable and why TLS does not verify."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.deploy.certs import make_certs
from fedseg.deploy.server_tls import ServerCertificate, superexec_host
from fedseg.deploy.superlink_probe import probe_superlink


def issue_server_cert(folder: Path, names: list[str], days: float = 30.0, ca_dir: Path | None = None) -> Path:
    """Replace folder/server.crt + server.key by a certificate for `names` valid until now + `days`
    (negative: expired), signed by the CA in `ca_dir` (default: `folder`'s own ca.crt / ca.key)."""
    ca_dir = ca_dir or folder
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=60))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    (folder / "server.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "server.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder


@contextmanager
def tls_listener(certs: Path) -> Iterator[int]:
    """A TLS server on 127.0.0.1 presenting certs/server.crt; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs / "server.crt", certs / "server.key")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        listener.close()
        thread.join(timeout=5)


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    make_certs(tmp_path / "certs", ["localhost"], ["site-a"])
    return tmp_path / "certs"


def server(*args: str):
    return CliRunner().invoke(app, ["server", *args])


def test_certs_always_name_localhost_for_the_superlinks_own_superexec(tmp_path: Path) -> None:
    make_certs(tmp_path, ["server.example.org"], ["a"])
    cert = ServerCertificate.load(tmp_path / "server.crt")
    assert cert.names == ["server.example.org", "localhost"]
    assert superexec_host(cert, "0.0.0.0") == "localhost"
    assert cert.covers("SERVER.example.org") and not cert.covers("127.0.0.1") and not cert.covers("example.org")


def test_server_prints_the_certificates_name_and_a_superexec_dialling_it(certs: Path) -> None:
    result = server("--certs", str(certs), "--port", "9500", "--print")
    assert result.exit_code == 0, result.output
    assert 'address = "localhost:9500"' in result.output
    assert "flower-superexec --runtime-api-address localhost:9500 --root-certificates" in result.output
    assert "--isolation process" in result.output


@pytest.mark.parametrize("start", [["--print"], []])
def test_server_refuses_a_printed_address_its_certificate_does_not_name(certs: Path, start: list[str]) -> None:
    result = server("--certs", str(certs), "--port", "9501", "--address", "127.0.0.1", *start)
    assert result.exit_code == 2
    assert result.output == (
        f"error: {certs / 'server.crt'}: is valid for localhost, not for '127.0.0.1' "
        "(make it with `fedseg certs ... --host 127.0.0.1`)\n"
    )


def test_server_refuses_a_certificate_its_superexec_cannot_verify(certs: Path) -> None:
    issue_server_cert(certs, ["server.example.invalid"])
    result = server("--certs", str(certs), "--port", "9502")
    assert result.exit_code == 2
    assert "none of its names (server.example.invalid) leads to this machine's SuperLink" in result.output
    assert len(result.output.splitlines()) == 1


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("expired", "server.crt: expired on "),
        ("other CA", "is not accepted by clients holding"),
        ("other key", "server.key: is not the key of"),
    ],
)
def test_server_refuses_expired_foreign_or_mismatched_certificates(
    certs: Path, tmp_path: Path, fault: str, message: str
) -> None:
    if fault == "expired":
        issue_server_cert(certs, ["localhost"], days=-1)
    elif fault == "other CA":
        make_certs(tmp_path / "other", ["localhost"], ["x"])
        issue_server_cert(certs, ["localhost"], ca_dir=tmp_path / "other")
    else:
        make_certs(tmp_path / "other", ["localhost"], ["x"])
        (certs / "server.key").write_bytes((tmp_path / "other" / "server.key").read_bytes())
    result = server("--certs", str(certs), "--port", "9503", "--print")
    assert result.exit_code == 2 and message in result.output, result.output
    assert len(result.output.splitlines()) == 1


def test_probe_verifies_a_superlink_that_its_certificate_names(certs: Path) -> None:
    with tls_listener(certs) as port:
        probe = probe_superlink(f"localhost:{port}", certs / "ca.crt")
    assert probe.ok, probe.lines
    assert [line.split(": ", 1)[1].split(" (")[0] for line in probe.lines] == [
        "'localhost' resolves to 127.0.0.1",
        "reachable",
        "TLS verified with ca.crt",
    ]


def test_probe_names_a_wrong_host_name(certs: Path) -> None:
    with tls_listener(certs) as port:
        probe = probe_superlink(f"127.0.0.1:{port}", certs / "ca.crt")
    assert not probe.ok
    assert "TLS: wrong name: the SuperLink's certificate is valid for localhost, not for '127.0.0.1'" in probe.lines[-1]


def test_probe_names_a_wrong_ca(certs: Path, tmp_path: Path) -> None:
    make_certs(tmp_path / "other", ["localhost"], ["x"])
    with tls_listener(certs) as port:
        probe = probe_superlink(f"localhost:{port}", tmp_path / "other" / "ca.crt")
    assert not probe.ok
    assert "TLS: wrong CA: the SuperLink's certificate was issued by 'CN=fedseg federation CA'" in probe.lines[-1]
    assert "another CA of that name" in probe.lines[-1]


def test_probe_names_an_expired_certificate(certs: Path) -> None:
    issue_server_cert(certs, ["localhost"], days=-2)
    with tls_listener(certs) as port:
        probe = probe_superlink(f"localhost:{port}", certs / "ca.crt")
    assert not probe.ok
    expired = (dt.datetime.now(dt.UTC) - dt.timedelta(days=2)).strftime("%Y-%m-%d")
    assert f"TLS: the SuperLink's certificate expired on {expired}" in probe.lines[-1]


def test_probe_says_when_nothing_listens_or_the_name_is_unknown(certs: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    refused = probe_superlink(f"localhost:{port}", certs / "ca.crt")
    assert not refused.ok and "connection refused: nothing listens on that port" in refused.lines[-1]
    unknown = probe_superlink("no-such-host.invalid:9092", certs / "ca.crt")
    assert not unknown.ok and len(unknown.lines) == 1
    assert unknown.lines[0].startswith("superlink no-such-host.invalid:9092: cannot resolve 'no-such-host.invalid' (")
    assert unknown.lines[0].endswith("): check the name")


def test_site_check_superlink_prints_one_verdict_per_step_and_exits_1_on_a_fault(certs: Path) -> None:
    ca = str(certs / "ca.crt")
    with tls_listener(certs) as port:
        good = CliRunner().invoke(app, ["site", "check", "--superlink", f"localhost:{port}", "--ca", ca])
        bad = CliRunner().invoke(app, ["site", "check", "--superlink", f"127.0.0.1:{port}", "--ca", ca])
    assert good.exit_code == 0, good.output
    assert good.output.splitlines()[-1] == "ready to join" and "TLS verified" in good.output
    assert bad.exit_code == 1 and "wrong name" in bad.output and "ready to join" not in bad.output
    alone = CliRunner().invoke(app, ["site", "check", "--superlink", "localhost:1"])
    assert alone.exit_code == 2 and "--superlink and --ca go together" in alone.output
