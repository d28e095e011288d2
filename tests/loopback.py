"""A federation on loopback for the deployment tests: a snapshot of the app, a private FLWR_HOME, the
SuperLink and SuperNodes started with fedseg's own commands (TLS, node authentication), `flwr run`
against it, and process helpers that stop exactly the processes a test started (never by name)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from conftest import REPO, TINY_RUN
from private_superlink import free_port

from fedseg.data.synth import write_site
from fedseg.local_superlink import flwr_environment, flwr_run_command, this_bin_dir

BIN = this_bin_dir()
# Tiny but learnable sites; a round-timeout long enough for a loaded 2-core machine
TINY = {**TINY_RUN, "synthetic-subjects": 4, "local-epochs": 1, "seed": 5, "min-sites": 2, "round-timeout": 90.0}
KILL_TIMEOUT_S = 20.0


@dataclass
class Federation:
    """The running federation: its folder (certificates in certs/, logs as <role>.log), environment,
    SuperLink port and `flwr` connection, the app snapshot `flwr run` packs, and its processes by role."""

    root: Path
    env: dict[str, str]
    port: int
    connection: str
    host: str = "localhost"
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def app(self) -> Path:
        return self.root / "app"

    def start(self, role: str, args: list[str]) -> subprocess.Popen:
        """`fedseg <args>` in the federation's folder, its output in <role>.log."""
        with open(self.root / f"{role}.log", "w") as log:
            proc = subprocess.Popen(
                [str(BIN / "fedseg"), *args],
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs[role] = proc
        return proc

    def log(self, role: str) -> str:
        return (self.root / f"{role}.log").read_text()

    def fedseg(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run([str(BIN / "fedseg"), *args])

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self._run([str(BIN / "flwr"), *args])

    def _run(self, command: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(command, env=self.env, cwd=self.root, capture_output=True, text=True, timeout=60)

    def serve(self, *options: str) -> None:
        """`fedseg server --certs certs --port P [options]` as the README starts it; returns once it listens."""
        self.start("superlink", ["server", "--certs", "certs", "--port", str(self.port), *options])
        wait_for(lambda: port_open(self.port), 300, "the SuperLink to listen")

    def register(self, name: str) -> None:
        """`flwr supernode register certs/sites/<name>/auth.pub <connection> --name <name>`."""
        registered = self.flwr("supernode", "register", f"certs/sites/{name}/auth.pub", self.connection, "--name", name)
        assert registered.returncode == 0, registered.stdout + registered.stderr

    def join(self, name: str, site_id: int) -> subprocess.Popen:
        """`fedseg site join` of site `name` (key certs/sites/<name>/auth.key) with a tiny synthetic site."""
        data = write_site(self.root / "data", site_id, TINY["synthetic-subjects"], TINY["synthetic-size"], 5)
        args = ["site", "join", "--superlink", f"{self.host}:{self.port}", "--data-dir", str(data)]
        args += ["--name", name, "--site-id", str(site_id), "--ca", "certs/ca.crt"]
        args += ["--auth-key", f"certs/sites/{name}/auth.key", "--local-port", str(free_port())]
        return self.start(name, args)

    def kill(self, role: str) -> None:
        """SIGKILL a started process and all its descendants: a site that dies without a goodbye."""
        proc = self.procs[role]
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.killpg(proc.pid, signal.SIGKILL)

    def run(self, run_config: dict[str, object], on_line: Callable[[str], None] | None = None) -> tuple[int, str]:
        """`flwr run . <connection> --stream` of the app snapshot; `on_line(line)` sees the streamed log."""
        command = flwr_run_command(Path("."), self.connection, run_config, [], [])
        proc = subprocess.Popen(
            command,
            env=self.env,
            cwd=self.app,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        lines = []
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                lines.append(line)
                if on_line is not None:
                    on_line(line)
            return proc.wait(timeout=60), "".join(lines)
        finally:
            stop(proc)

    def supernodes(self) -> list[dict]:
        """The SuperLink's node list (`flwr supernode list`): node-id, status, online-at, ..."""
        listed = self.flwr("supernode", "list", self.connection, "--format", "json")
        assert listed.returncode == 0, listed.stderr
        return json.loads(listed.stdout[listed.stdout.index("{") :])["nodes"]

    def close(self) -> None:
        """Stop every process this federation started (last started first) and remove its folder."""
        for proc in reversed(list(self.procs.values())):
            stop(proc)
        shutil.rmtree(self.root, ignore_errors=True)


def new_federation(connection: str, host: str = "localhost") -> Federation:
    """A federation folder (not pytest's tmp_path: other pytest sessions on the machine may rotate it away
    mid-run) with a private FLWR_HOME, an app snapshot and a free SuperLink port; nothing started yet."""
    root = Path(tempfile.mkdtemp(prefix="fedseg-loopback-"))
    (root / "flwr-home").mkdir()
    snapshot_app(root / "app")
    env = flwr_environment(
        FLWR_HOME=str(root / "flwr-home"),
        FEDSEG_CACHE=str(root / "cache"),
        PYTHONPATH=f"{root / 'app'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    return Federation(root, env, free_port(), connection, host)


def snapshot_app(folder: Path) -> Path:
    """A copy of this app (what `flwr run .` packs): the sites' workers and the run's FAB then hold the
    same code even while the working tree changes under the test."""
    folder.mkdir()
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy2(REPO / name, folder / name)
    for package in ("fedseg", "clients", "strategies", "configs"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def descendants(pid: int) -> list[int]:
    """Child processes of `pid`, recursively (from /proc; Flower starts helpers in new sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def stop(proc: subprocess.Popen) -> None:
    """Stop a process we started, its group and every descendant: TERM, then KILL after a timeout."""
    pids = [proc.pid, *descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig) if pid == proc.pid else os.kill(pid, sig)
        try:
            proc.wait(timeout=KILL_TIMEOUT_S)
            if not any(_alive(pid) for pid in pids[1:]):
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def history_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())
