"""Deployment on loopback, following README "Real sites" command by command: SuperLink + 2 SuperNodes
with TLS and node authentication, on the host name `localhost` (a certificate without any IP).

`fedseg certs certs --host localhost --site ...`, `fedseg server --certs certs --port P` (its printed
connection table goes into a private FLWR_HOME as the README says), `flwr supernode register ...`,
`fedseg site join --superlink localhost:P ... --local-port ...` (distinct local ports, each site
with its warm worker), then `flwr run . fedseg`. Checks: an unregistered SuperNode is refused; 2
rounds write the history, answered by the sites' workers; resuming that run continues it, a
SuperNode killed during the resumed run does not stop it, and once restarted that site rejoins.
Only processes this module started are stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, toml_value

from fedseg.data.synth import write_site
from fedseg.deploy.certs import CertBundle, SiteKeys

CONNECTION = "fedseg"  # the name `fedseg server` prints and the README uses
BIN = Path(sys.executable).parent
TINY = {
    "synthetic-size": 24,
    "synthetic-subjects": 4,
    "patch-size": "16,16,16",
    "batch-size": 2,
    "local-epochs": 1,
    "learning-rate": 0.01,
    "seed": 5,
    "min-sites": 2,
    "round-timeout": 90.0,
}
KILL_TIMEOUT_S = 20.0


@dataclass
class Loopback:
    """The running federation: its folders, environment and processes (by role)."""

    root: Path
    env: dict[str, str]
    certs: CertBundle
    port: int
    app: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, role: str, args: list[str]) -> subprocess.Popen:
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

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def join(self, role: str, name: str, site_id: int, key: Path) -> subprocess.Popen:
        data = write_site(self.root / "data", site_id, TINY["synthetic-subjects"], TINY["synthetic-size"], 5)
        return self.start(
            role,
            [
                "site",
                "join",
                "--superlink",
                f"localhost:{self.port}",
                "--data-dir",
                str(data),
                "--name",
                name,
                "--site-id",
                str(site_id),
                "--ca",
                "certs/ca.crt",
                "--auth-key",
                str(key.relative_to(self.root)),
                "--local-port",
                str(free_port()),
            ],
        )


def snapshot_app(folder: Path) -> Path:
    """A copy of this app (what `flwr run .` packs): the sites' workers and the run's FAB then hold the
    same code even while the working tree changes under the test."""
    folder.mkdir()
    for name in ("pyproject.toml", ".gitignore"):
        shutil.copy2(REPO / name, folder / name)
    for package in ("fedseg", "clients", "strategies", "configs"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
            if not any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in pids[1:]):
                return
        except subprocess.TimeoutExpired:
            pass
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.5)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def loopback() -> Iterator[Loopback]:
    # Not pytest's tmp_path: other pytest sessions on the machine may rotate it away mid-run.
    root = Path(tempfile.mkdtemp(prefix="fedseg-loopback-"))
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    app = snapshot_app(root / "app")
    port = free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FEDSEG_CACHE": str(root / "cache"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{app}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    made = subprocess.run(
        [
            str(BIN / "fedseg"),
            "certs",
            "certs",
            "--host",
            "localhost",
            "--site",
            "site-a",
            "--site",
            "site-b",
            "--site",
            "intruder",
            "--port",
            str(port),
        ],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    certs = CertBundle(
        root / "certs/ca.crt",
        root / "certs/ca.key",
        root / "certs/server.crt",
        root / "certs/server.key",
        [
            SiteKeys(n, root / f"certs/sites/{n}/auth.key", root / f"certs/sites/{n}/auth.pub")
            for n in ("site-a", "site-b", "intruder")
        ],
    )
    fed = Loopback(root, env, certs, port, app)
    try:
        fed.start("superlink", ["server", "--certs", "certs", "--port", str(port)])
        wait_for(lambda: "starting its SuperExec" in fed.log("superlink"), 300, "the SuperLink to start")
        # README: add the printed [superlink.fedseg] table to $FLWR_HOME/config.toml
        printed = fed.log("superlink")
        table = printed[printed.index(f"[superlink.{CONNECTION}]") :].split("\n\n")[0].split("\nflower-superlink")[0]
        assert f'address = "localhost:{port}"' in table, printed
        (flwr_home / "config.toml").write_text(table.strip() + "\n")
        for keys in certs.sites[:2]:
            registered = fed.flwr(
                "supernode", "register", str(keys.public_key.relative_to(root)), CONNECTION, "--name", keys.name
            )
            assert registered.returncode == 0, registered.stdout + registered.stderr
        fed.join("site-a", "site-a", 0, certs.sites[0].private_key)
        fed.join("site-b", "site-b", 1, certs.sites[1].private_key)
        for role in ("site-a", "site-b"):
            wait_for(lambda role=role: "site worker ready" in fed.log(role), 600, f"{role}'s warm worker")
        yield fed
    finally:
        for proc in reversed(list(fed.procs.values())):
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def flwr_run(fed: Loopback, run_config: dict[str, object], on_line=None) -> tuple[int, str]:
    """`flwr run` this app on the loopback SuperLink; `on_line(line)` sees the streamed log."""
    overrides = " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())
    proc = subprocess.Popen(
        [str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", overrides],
        env=fed.env,
        cwd=fed.app,
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


def supernodes(fed: Loopback) -> list[dict]:
    """The SuperLink's node list (`flwr supernode list`): node-id, status, online-at, ..."""
    listed = fed.flwr("supernode", "list", CONNECTION, "--format", "json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout[listed.stdout.index("{") :])["nodes"]


def history_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "history.json").read_text())


@pytest.fixture(scope="module")
def first_run(loopback: Loopback) -> tuple[Path, str]:
    """Two rounds over the two authenticated sites."""
    output = loopback.root / "runs"
    code, log = flwr_run(loopback, {**TINY, "num-server-rounds": 2, "output-dir": str(output)})
    assert code == 0 and "final mean Dice" in log, log
    run_dirs = [p for p in output.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, log
    return run_dirs[0], log


def test_unregistered_supernode_is_refused(loopback: Loopback) -> None:
    intruder = loopback.join("intruder", "intruder", 2, loopback.certs.sites[2].private_key)
    assert intruder.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in loopback.log("intruder")
    assert len(supernodes(loopback)) == 2


def test_two_rounds_over_tls_with_authenticated_sites(first_run: tuple[Path, str]) -> None:
    run_dir, log = first_run
    rounds = history_of(run_dir)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(set(r["eval"]) == {"site-0", "site-1"} for r in rounds)
    assert set(rounds[-1]["train"]) == {"site-0", "site-1"}
    assert all(r["failures"] == [] and r["dropped"] == [] for r in rounds)
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "model.pt").is_file()
    assert "final mean Dice" in log


def test_the_sites_warm_workers_answered_every_message(loopback: Loopback, first_run: tuple[Path, str]) -> None:
    for role in ("site-a", "site-b"):
        log = loopback.log(role)
        # 3 evaluations (rounds 0-2) and 2 trainings, none answered by a fresh ClientApp process instead
        assert log.count("fedseg site worker: evaluate answered") >= 3, log[-3000:]
        assert log.count("fedseg site worker: train answered") >= 2, log[-3000:]
        assert "answering in this process" not in log


def test_resume_continues_survives_a_killed_supernode_and_readmits_it_restarted(
    loopback: Loopback, first_run: tuple[Path, str]
) -> None:
    run_dir, _ = first_run
    before = history_of(run_dir)["rounds"]
    events: list[str] = []

    def kill_site_b_once_resumed_then_restart_it(line: str) -> None:
        site_b = loopback.procs["site-b"]
        if "resuming" in line and "killed" not in events:
            for pid in descendants(site_b.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(site_b.pid, signal.SIGKILL)
            events.append("killed")
        elif "site-1 dropped" in line and "restarted" not in events:
            site_b.wait(timeout=KILL_TIMEOUT_S)
            # Flower 1.41 refuses to activate a node (exit 305) until its old session is marked offline:
            # two missed 30 s heartbeats
            wait_for(lambda: any(n["status"] == "offline" for n in supernodes(loopback)), 120, "site-b offline")
            loopback.join("site-b", "site-b", 1, loopback.certs.sites[1].private_key)  # same key: same node id
            events.append("restarted")

    overrides = {
        **TINY,
        "num-server-rounds": 8,
        "output-dir": str(loopback.root / "runs"),
        "resume-from": str(run_dir),
        "round-timeout": 40.0,
    }
    code, log = flwr_run(loopback, overrides, on_line=kill_site_b_once_resumed_then_restart_it)
    assert code == 0 and "final mean Dice" in log, log
    assert events == ["killed", "restarted"], log
    rounds = history_of(run_dir)["rounds"]
    assert [r["round"] for r in rounds] == list(range(9))
    assert [r["eval"] for r in rounds[:3]] == [r["eval"] for r in before], "finished rounds are kept as they were"
    assert rounds[3]["dropped"] == ["site-1"], rounds[3]
    assert set(rounds[3]["train"]) == {"site-0"} and set(rounds[3]["eval"]) == {"site-0"}
    # the restarted site answers the server's probe and trains and evaluates again
    fedseg_lines = "".join(line for line in log.splitlines(keepends=True) if "fedseg" in line or "failed" in line)
    back = [r["round"] for r in rounds if r["rejoined"] == ["site-1"]]
    assert len(back) == 1 and back[0] >= 4, fedseg_lines
    assert set(rounds[-1]["eval"]) == {"site-0", "site-1"}, fedseg_lines
    assert "site-1 is back" in log
