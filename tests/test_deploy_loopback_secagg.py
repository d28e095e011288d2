"""Secure aggregation in deployment on loopback: SuperLink + 3 SuperNodes, TLS and node authentication.

Started through fedseg's own commands, as tests/test_deploy_loopback.py does (its helpers). Two
secure rounds; one SuperNode is killed while round 2 trains: the round completes from the other
two sites' masked updates (the killed site's pairwise masks are rebuilt from the survivors' shares),
and no site ever sent its weights in the clear (the server log names the masked sums only).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO
from test_deploy_loopback import (
    BIN,
    CONNECTION,
    TINY,
    Loopback,
    descendants,
    flwr_run,
    free_port,
    history_of,
    port_open,
    stop,
    wait_for,
)

from fedseg.deploy.certs import make_certs
from fedseg.deploy.launch import connection_toml

SITES = ("site-a", "site-b", "site-c")


@pytest.fixture(scope="module")
def three_sites() -> Iterator[Loopback]:
    root = Path(tempfile.mkdtemp(prefix="fedseg-loopback-secagg-"))
    flwr_home = root / "flwr-home"
    flwr_home.mkdir()
    certs = make_certs(root / "certs", ["127.0.0.1", "localhost"], list(SITES))
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n' + connection_toml(CONNECTION, f"127.0.0.1:{port}", certs.ca_cert)
    )
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    fed = Loopback(root, env, certs, port)
    try:
        fed.start("superlink", ["server", "--certs", str(root / "certs"), "--host", "127.0.0.1", "--port", str(port)])
        wait_for(lambda: port_open(port), 60, "the SuperLink to listen")
        for keys in certs.sites:
            registered = fed.flwr("supernode", "register", str(keys.public_key), CONNECTION, "--name", keys.name)
            assert registered.returncode == 0, registered.stdout + registered.stderr
        for site_id, keys in enumerate(certs.sites):
            fed.join(keys.name, keys.name, site_id, keys.private_key)
        yield fed
    finally:
        for proc in reversed(list(fed.procs.values())):
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)


def test_secure_rounds_over_tls_recover_a_site_killed_while_training(three_sites: Loopback) -> None:
    killed: list[str] = []

    def kill_site_c_in_round_2_training(line: str) -> None:
        if "secure aggregation: round 2:" in line and "train and mask" in line and not killed:
            site_c = three_sites.procs["site-c"]
            for pid in descendants(site_c.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(site_c.pid, signal.SIGKILL)
            killed.append("site-c")

    output = three_sites.root / "runs"
    overrides = {**TINY, "num-server-rounds": 2, "output-dir": str(output), "min-sites": 3,
                 "secure-aggregation": True, "round-timeout": 120.0}
    code, log = flwr_run(three_sites, overrides, on_line=kill_site_c_in_round_2_training)
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
