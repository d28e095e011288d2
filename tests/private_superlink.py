"""A private Flower home and local SuperLink for tests: own FLWR_HOME and ports, so a test never uses
(or leaves behind) the machine's shared local SuperLink."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fedseg.local_superlink import find_local_superlink, stop_local_superlink


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def private_flwr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A private FLWR_HOME and local SuperLink ports (also set in this process); any SuperLink on them
    is stopped at the end."""
    env = {
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield {**os.environ, **env}
    superlink = find_local_superlink()
    if superlink is not None:
        stop_local_superlink(superlink)


def start_local_superlink(bin_dir: Path, folder: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a local SuperLink as `flwr` does (flwr.cli.local_superlink), from `folder`, with the
    flower-superlink of `bin_dir` and environment `env`; wait until it answers."""
    home = Path(env["FLWR_HOME"]) / "local-superlink"
    home.mkdir(parents=True, exist_ok=True)
    http = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    command = [
        str(bin_dir / "flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation",
        "subprocess",
        "--control-api-address",
        f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
        "--host",
        "127.0.0.1",
        "--port",
        http,
        "--database",
        str(home / "state.db"),
        "--log-file",
        str(home / "superlink.log"),
    ]
    env = {**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"}  # it starts flower-superexec by name
    proc = subprocess.Popen(
        command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flower-superlink exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{http}/health", timeout=2).is_success:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("the local SuperLink did not start within 180 s")


def stop_processes(pids: list[int], grace_s: float = 10.0) -> None:
    """TERM these processes, then KILL the ones still there after `grace_s`."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
