"""`fedseg certs` material and the launch command lines of `fedseg server` / `fedseg site join`."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.deploy.certs import make_certs
from fedseg.deploy.launch import TlsFiles, connection_toml, node_config, superlink_command, supernode_command


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    return make_certs(tmp_path_factory.mktemp("certs"), ["127.0.0.1", "localhost"], ["site-a", "site-b"])


def test_server_certificate_is_issued_by_the_ca_for_the_hosts(bundle) -> None:
    ca = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]


def test_tls_handshake_with_the_ca_succeeds_for_each_host(bundle) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(bundle.server_cert, bundle.server_key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(2)
        port = listener.getsockname()[1]

        def serve() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cafile=str(bundle.ca_cert))
        for host in ("127.0.0.1", "localhost"):
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                client_ctx.wrap_socket(raw, server_hostname=host) as tls,
            ):
                assert tls.version() in ("TLSv1.2", "TLSv1.3")
                tls.sendall(b"x")
        thread.join(timeout=10)


def test_tls_handshake_fails_without_the_federation_ca(bundle, tmp_path: Path) -> None:
    other = make_certs(tmp_path, ["127.0.0.1"], [])
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(bundle.server_cert, bundle.server_key)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                server_ctx.wrap_socket(conn, server_side=True).close()
            except ssl.SSLError:
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        client_ctx = ssl.create_default_context(cafile=str(other.ca_cert))
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            pytest.raises(ssl.SSLCertVerificationError),
        ):
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def test_site_keys_are_matching_ec_openssh_pairs_readable_by_owner_only(bundle) -> None:
    assert [s.name for s in bundle.sites] == ["site-a", "site-b"]
    for site in bundle.sites:
        private = load_ssh_private_key(site.private_key.read_bytes(), None)
        public = load_ssh_public_key(site.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert stat.S_IMODE(site.private_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(bundle.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(bundle.server_key.stat().st_mode) == 0o600
    assert bundle.registration_commands("fed") == [
        f"flwr supernode register {s.public_key} fed --name {s.name}" for s in bundle.sites
    ]


@pytest.mark.parametrize(
    ("sites", "message"),
    [
        (["ok", "bad name"], "site name 'bad name' must be"),
        (["a", "a"], "site names must be unique"),
    ],
)
def test_bad_site_names_are_rejected(tmp_path: Path, sites: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_certs(tmp_path, ["127.0.0.1"], sites)


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("0.0.0.0", "'0.0.0.0' is the listen-on-all address"),
        ("::", "'::' is the listen-on-all address"),
        ("239.1.2.3", "is a multicast address"),
        ("fe80::1%eth0", r"has a zone \(%eth0\)"),
        ("192.168.1.256", "looks like an IPv4 address but is not one"),
        ("10.1.2", "looks like an IPv4 address but is not one"),
        ("*.org", "a wildcard needs at least two labels after"),
        ("fed.*.example.org", "is neither an IP address nor a DNS name"),
        ("fed..example.org", "is neither an IP address nor a DNS name"),
        ("fed example.org", "is neither an IP address nor a DNS name"),
        ("::ffff:0.0.0.0", "is the listen-on-all address"),  # IPv4-mapped
        ("::ffff:224.0.0.1", "is a multicast address"),
        ("255.255.255.255", "is the broadcast address"),
        ("fe80::1", "is an IPv6 link-local address"),
        ("0x7f000001", "looks like an IPv4 address"),  # resolvers read it as 127.0.0.1
        ("127.0.0.0x1", "looks like an IPv4 address"),
    ],
)
def test_hosts_a_site_cannot_dial_are_rejected(tmp_path: Path, host: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_certs(tmp_path, ["fed.example.org", host], ["site-a"])
    assert not any(tmp_path.iterdir())  # all files or none


def test_a_wildcard_and_an_ipv6_address_are_certified(tmp_path: Path) -> None:
    cert = x509.load_pem_x509_certificate(
        make_certs(tmp_path, ["*.fed.example.org", "2001:db8::7"], ["site-a"]).server_cert.read_bytes()
    )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["*.fed.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["2001:db8::7"]


def test_superlink_command_has_tls_node_auth_and_no_runtime_installs(bundle) -> None:
    tls = TlsFiles.from_dir(bundle.ca_cert.parent)
    command = superlink_command(tls, host="127.0.0.1", port=9999)
    assert command[:6] == [
        "flower-superlink",
        "--host",
        "127.0.0.1",
        "--port",
        "9999",
        "--disable-runtime-dependency-installation",
    ]
    assert command[command.index("--ssl-ca-certfile") + 1] == str(bundle.ca_cert.resolve())
    assert command[command.index("--ssl-keyfile") + 1] == str(bundle.server_key.resolve())
    assert "--enable-supernode-auth" in command and "--insecure" not in command
    trial = superlink_command(None, node_auth=False)
    assert "--insecure" in trial and "--enable-supernode-auth" not in trial


def test_supernode_command_passes_data_dir_and_site_id(tmp_path: Path, bundle) -> None:
    key = bundle.sites[0].private_key
    command = supernode_command("server:9092", tmp_path / "my data", 3, bundle.ca_cert, key, local_port=9200)
    assert command[command.index("--node-config") + 1] == f'data-dir="{tmp_path / "my data"}" site-id=3'
    assert command[command.index("--root-certificates") + 1] == str(bundle.ca_cert.resolve())
    assert command[command.index("--auth-supernode-private-key") + 1] == str(key.resolve())
    assert command[command.index("--port") + 1] == "9200"
    assert "--insecure" in supernode_command("server:9092", tmp_path, 0, None, None)
    assert node_config("~/x", 1) == f'data-dir="{Path("~/x").expanduser().resolve()}" site-id=1'


def test_connection_table_for_flwr(bundle) -> None:
    assert connection_toml("fed", "host:1", bundle.ca_cert) == (
        f'[superlink.fed]\naddress = "host:1"\nroot-certificates = "{bundle.ca_cert.resolve()}"\n'
    )
    assert connection_toml("t", "127.0.0.1:2", None).endswith("insecure = true\n")


def test_cli_refuses_a_server_without_tls_unless_insecure(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["server", "--print"])
    assert result.exit_code == 2
    assert "give --certs DIR" in result.output
    missing = CliRunner().invoke(app, ["server", "--certs", str(tmp_path), "--print"])
    assert missing.exit_code == 2 and "ca.crt" in missing.output and "fedseg certs" in missing.output


def test_cli_certs_and_join_print_the_site_commands(tmp_path: Path) -> None:
    made = CliRunner().invoke(
        app,
        [
            "certs",
            str(tmp_path / "c"),
            "--host",
            "srv.example.org",
            "--site",
            "north",
            "--site",
            "south",
            "--port",
            "7000",
        ],
    )
    assert made.exit_code == 0, made.output
    assert (
        f"flwr supernode register {tmp_path / 'c' / 'sites' / 'north' / 'auth.pub'} fedseg --name north" in made.output
    )
    assert "fedseg site join --superlink srv.example.org:7000 --data-dir DATA --name south --site-id 1" in made.output
    joined = CliRunner().invoke(
        app,
        [
            "site",
            "join",
            "--superlink",
            "srv.example.org:7000",
            "--data-dir",
            str(tmp_path),
            "--name",
            "north",
            "--site-id",
            "0",
            "--ca",
            str(tmp_path / "c" / "ca.crt"),
            "--auth-key",
            str(tmp_path / "c" / "sites" / "north" / "auth.key"),
            "--print",
        ],
    )
    assert joined.exit_code == 0, joined.output
    assert joined.output.startswith("site north: flower-supernode --superlink srv.example.org:7000")
    refused = CliRunner().invoke(
        app, ["site", "join", "--superlink", "s:1", "--data-dir", ".", "--name", "n", "--site-id", "0", "--print"]
    )
    assert refused.exit_code == 2 and "--insecure for a local trial" in refused.output
