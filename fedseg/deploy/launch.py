"""Command lines of the Flower processes a real federation runs, and the `flwr` connection entry.

- Coordinating site: `flower-superlink` (TLS, SuperNode authentication on by default,
  runtime dependency installation off: the server never pip-installs what a run asks for) and,
  with TLS, its `flower-superexec` started apart (process isolation) so that it dials the SuperLink
  by a name the certificate covers (Flower's own would dial 127.0.0.1 for a 0.0.0.0 listener).
- Each hospital: `flower-supernode` with its data folder and site number as node config.
- Whoever submits runs: a named connection in `$FLWR_HOME/config.toml` for `flwr run`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_PORT = 9092
DEFAULT_LOCAL_PORT = 9094  # the SuperNode's own runtime API (localhost only)


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS files as `fedseg certs` writes them into one folder."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def from_dir(cls, certs_dir: str | Path) -> TlsFiles:
        folder = Path(certs_dir).expanduser().resolve()
        files = cls(folder / "ca.crt", folder / "server.crt", folder / "server.key")
        missing = [str(p) for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"TLS files not found: {', '.join(missing)} (make them with `fedseg certs`)")
        return files


def superlink_command(
    tls: TlsFiles | None,
    host: str = "0.0.0.0",
    port: int = DEFAULT_PORT,
    node_auth: bool = True,
    database: str | None = None,
) -> list[str]:
    """`flower-superlink` with TLS (None: --insecure, for local trials only) and node auth. With TLS
    the SuperExec is not Flower's auto-started one (`--isolation process`): see `superexec_command`."""
    command = ["flower-superlink", "--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if tls is None:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(tls.ca_cert),
            "--ssl-certfile",
            str(tls.server_cert),
            "--ssl-keyfile",
            str(tls.server_key),
            "--isolation",
            "process",
        ]
    if node_auth:
        command.append("--enable-supernode-auth")
    if database:
        command += ["--database", database]
    return command


def superexec_command(runtime_address: str, ca_cert: str | Path, parent_pid: int | None = None) -> list[str]:
    """`flower-superexec` running the ServerApps of the SuperLink at `runtime_address` ('host:port', the
    host a name of the SuperLink's certificate), verifying it with `ca_cert`; it stops with `parent_pid`."""
    command = [
        "flower-superexec",
        "--runtime-api-address",
        runtime_address,
        "--root-certificates",
        str(Path(ca_cert).expanduser().resolve()),
    ]
    return command + (["--parent-pid", str(parent_pid)] if parent_pid is not None else [])


def node_config(data_dir: str | Path, site_id: int, worker: str | Path | None = None) -> str:
    """The SuperNode's node config: where this site's data lives, its site number and, when the site
    runs a warm worker (fedseg.deploy.site_worker), that worker's socket."""
    folder = str(Path(data_dir).expanduser().resolve())
    config = f"data-dir={json.dumps(folder)} site-id={int(site_id)}"
    return config + (f" worker={json.dumps(str(worker))}" if worker is not None else "")


def supernode_command(
    superlink: str,
    data_dir: str | Path,
    site_id: int,
    root_certificates: str | Path | None,
    auth_key: str | Path | None,
    local_port: int = DEFAULT_LOCAL_PORT,
    worker: str | Path | None = None,
) -> list[str]:
    """`flower-supernode` for one site; root_certificates None means --insecure (local trials)."""
    command = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--node-config",
        node_config(data_dir, site_id, worker),
        "--host",
        "127.0.0.1",
        "--port",
        str(local_port),
    ]
    if root_certificates is None:
        command.append("--insecure")
    else:
        command += ["--root-certificates", str(Path(root_certificates).expanduser().resolve())]
    if auth_key is not None:
        command += ["--auth-supernode-private-key", str(Path(auth_key).expanduser().resolve())]
    return command


def connection_toml(name: str, address: str, root_certificates: str | Path | None) -> str:
    """A `[superlink.<name>]` table for `$FLWR_HOME/config.toml` (`flwr run . <name>`)."""
    lines = [f"[superlink.{name}]", f"address = {json.dumps(address)}"]
    if root_certificates is None:
        lines.append("insecure = true")
    else:
        lines.append(f"root-certificates = {json.dumps(str(Path(root_certificates).expanduser().resolve()))}")
    return "\n".join(lines) + "\n"


def site_worker_socket(data_dir: str | Path) -> Path:
    """Where the warm worker of the site with data in `data_dir` listens (under $FEDSEG_CACHE)."""
    from fedseg.cache import cache_root
    from fedseg.deploy.site_worker import socket_path_for

    return socket_path_for(str(Path(data_dir).expanduser().resolve()), cache_root())


def start_site_worker(socket: Path) -> None:
    """Start the site's warm worker (fedseg.deploy.site_worker) on `socket` as a child of this process,
    which then becomes the SuperNode (exec keeps the process id): the worker ends with it."""
    subprocess.Popen(
        [sys.executable, "-m", "fedseg.deploy.site_worker", "--socket", str(socket), "--parent-pid", str(os.getpid())],
        env=flower_environment(),
    )


def shell_line(command: list[str]) -> str:
    """The command as one copy-pasteable shell line."""
    return shlex.join(command)


def exec_flower(command: list[str]) -> None:
    """Replace this process with the Flower command (found beside this Python first, then on PATH)."""
    program, *args = flower_program(command)
    os.execvpe(program, [program, *args], flower_environment())


def flower_program(command: list[str]) -> list[str]:
    """The command with its program found beside this Python first (a virtual environment), then on PATH."""
    beside = Path(sys.executable).parent / command[0]
    return [str(beside) if beside.is_file() else command[0], *command[1:]]


def flower_environment() -> dict[str, str]:
    """This process's environment, with runtime dependency installation off."""
    return {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
