"""Secure aggregation in deployment on loopback: SuperLink + 3 SuperNodes, TLS and node authentication.

Started through fedseg's own commands (`fedseg server`, `fedseg site join`) from a snapshot of the
app, on 127.0.0.1 and free ports, with a private FLWR_HOME (process helpers from
tests/test_deploy_loopback.py). Two
secure rounds; one SuperNode is killed while round 2 trains: the round completes from the other
two sites' masked updates (the killed site's pairwise masks are rebuilt from the survivors' shares),
and no site ever sent its weights in the clear (the server log names the masked sums only).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO, toml_value
from test_deploy_loopback import (
    BIN,
    TINY,
    descendants,
    free_port,
    history_of,
    port_open,
    stop,
    wait_for,
)

from fedseg.data.synth import write_site
from fedseg.deploy.certs import make_certs
from fedseg.deploy.launch import connection_toml

CONNECTION = "fedseg-secagg"
SITES = ("site-a", "site-b", "site-c")


@dataclass
class Federation:
    """SuperLink + SuperNodes started with fedseg's commands from a snapshot of the app."""

    root: Path
    env: dict[str, str]
    app: Path
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, role: str, args: list[str]) -> None:
        with open(self.root / f"{role}.log", "w") as log:
            self.procs[role] = subprocess.Popen(
                [sys.executable, "-m", "fedseg.cli", *args],
                env=self.env,
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def flwr(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "flwr"), *args],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def run(self, run_config: dict[str, object], on_line: Callable[[str], None]) -> tuple[int, str]:
        """`flwr run` the app snapshot; `on_line(line)` sees the streamed server log."""
        overrides = " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())
        proc = subprocess.Popen(
            [str(BIN / "flwr"), "run", ".", CONNECTION, "--stream", "--run-config", overrides],
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
                on_line(line)
            return proc.wait(timeout=60), "".join(lines)
        finally:
            stop(proc)


def snapshot(folder: Path) -> Path:
    """The app as `flwr run .` packs it, copied: the run does not see the working tree change under it."""
    folder.mkdir()
    shutil.copy2(REPO / "pyproject.toml", folder / "pyproject.toml")
    for package in ("fedseg", "clients", "strategies"):
        shutil.copytree(REPO / package, folder / package, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


@pytest.fixture(scope="module")
def three_sites() -> Iterator[Federation]:
    root = Path(tempfile.mkdtemp(prefix="fedseg-loopback-secagg-"))
    (root / "flwr-home").mkdir()
    app = snapshot(root / "app")
    certs = make_certs(root / "certs", ["127.0.0.1", "localhost"], list(SITES))
    port = free_port()
    (root / "flwr-home" / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n' + connection_toml(CONNECTION, f"127.0.0.1:{port}", certs.ca_cert)
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(root / "flwr-home"),
        "FEDSEG_CACHE": str(root / "cache"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": f"{app}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    fed = Federation(root, env, app)
    try:
        fed.start("superlink", ["server", "--certs", str(root / "certs"), "--host", "127.0.0.1", "--port", str(port)])
        wait_for(lambda: port_open(port), 90, "the SuperLink to listen")
        for site_id, keys in enumerate(certs.sites):
            registered = fed.flwr("supernode", "register", str(keys.public_key), CONNECTION, "--name", keys.name)
            assert registered.returncode == 0, registered.stdout + registered.stderr
            data = write_site(root / "data", site_id, TINY["synthetic-subjects"], TINY["synthetic-size"], 5)
            fed.start(
                keys.name,
                [
                    "site",
                    "join",
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--data-dir",
                    str(data),
                    "--name",
                    keys.name,
                    "--site-id",
                    str(site_id),
                    "--ca",
                    str(certs.ca_cert),
                    "--auth-key",
                    str(keys.private_key),
                    "--local-port",
                    str(free_port()),
                ],
            )
        yield fed
    finally:
        for proc in reversed(list(fed.procs.values())):
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def test_secure_rounds_over_tls_recover_a_site_killed_while_training(three_sites: Federation) -> None:
    killed: list[str] = []

    def kill_site_c_in_round_2_training(line: str) -> None:
        if "secure aggregation: round 2:" in line and "train and mask" in line and not killed:
            site_c = three_sites.procs["site-c"]
            for pid in descendants(site_c.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(site_c.pid, signal.SIGKILL)
            killed.append("site-c")

    output = three_sites.root / "runs"
    overrides = {
        **TINY,
        "num-server-rounds": 2,
        "output-dir": str(output),
        "min-sites": 3,
        "secure-aggregation": True,
        "round-timeout": 120.0,
    }
    code, log = three_sites.run(overrides, kill_site_c_in_round_2_training)
    assert code == 0 and "final mean Dice" in log, log
    assert killed == ["site-c"], log
    (run_dir,) = [p for p in output.iterdir() if p.is_dir()]
    rounds = history_of(run_dir)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert set(rounds[1]["train"]) == {"site-0", "site-1", "site-2"}
    assert "round 1 summed 3 site(s)" in log
    assert set(rounds[2]["train"]) == {"site-0", "site-1"} and rounds[2]["dropped"] == ["site-2"], rounds[2]
    assert "round 2 summed 2 site(s), 1 dropped site(s) unmasked" in log  # recovered, not skipped
    assert not any(f["site"] == "all" for r in rounds for f in r["failures"])
    assert (run_dir / "model.pt").is_file()
