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

from collections.abc import Iterator
from pathlib import Path

import pytest
from loopback import KILL_TIMEOUT_S, TINY, Federation, history_of, new_federation, wait_for

CONNECTION = "fedseg"  # the name `fedseg server` prints and the README uses
SITES = ("site-a", "site-b")


@pytest.fixture(scope="module")
def loopback() -> Iterator[Federation]:
    fed = new_federation(CONNECTION)
    try:
        sites = ["--site", "site-a", "--site", "site-b", "--site", "intruder"]
        made = fed.fedseg("certs", "certs", "--host", "localhost", *sites, "--port", str(fed.port))
        assert made.returncode == 0, made.stderr
        fed.serve()
        wait_for(lambda: "starting its SuperExec" in fed.log("superlink"), 300, "the SuperLink to start")
        # README: add the printed [superlink.fedseg] table to $FLWR_HOME/config.toml
        printed = fed.log("superlink")
        table = printed[printed.index(f"[superlink.{CONNECTION}]") :].split("\n\n")[0].split("\nflower-superlink")[0]
        assert f'address = "localhost:{fed.port}"' in table, printed
        (fed.root / "flwr-home" / "config.toml").write_text(table.strip() + "\n")
        for site_id, name in enumerate(SITES):
            fed.register(name)
            fed.join(name, site_id)
        for name in SITES:
            wait_for(lambda name=name: "site worker ready" in fed.log(name), 600, f"{name}'s warm worker")
        yield fed
    finally:
        fed.close()


@pytest.fixture(scope="module")
def first_run(loopback: Federation) -> tuple[Path, str]:
    """Two rounds over the two authenticated sites."""
    output = loopback.root / "runs"
    code, log = loopback.run({**TINY, "num-server-rounds": 2, "output-dir": str(output)})
    assert code == 0 and "final mean Dice" in log, log
    run_dirs = [p for p in output.iterdir() if p.is_dir()]
    assert len(run_dirs) == 1, log
    return run_dirs[0], log


def test_unregistered_supernode_is_refused(loopback: Federation) -> None:
    intruder = loopback.join("intruder", 2)
    assert intruder.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in loopback.log("intruder")
    assert len(loopback.supernodes()) == 2


def test_two_rounds_over_tls_with_authenticated_sites(first_run: tuple[Path, str]) -> None:
    run_dir, log = first_run
    rounds = history_of(run_dir)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(set(r["eval"]) == {"site-0", "site-1"} for r in rounds)
    assert set(rounds[-1]["train"]) == {"site-0", "site-1"}
    assert all(r["failures"] == [] and r["dropped"] == [] for r in rounds)
    assert (run_dir / "checkpoint.pt").is_file() and (run_dir / "model.pt").is_file()
    assert "final mean Dice" in log


def test_the_sites_warm_workers_answered_every_message(loopback: Federation, first_run: tuple[Path, str]) -> None:
    for role in ("site-a", "site-b"):
        log = loopback.log(role)
        # 3 evaluations (rounds 0-2) and 2 trainings, none answered by a fresh ClientApp process instead
        assert log.count("fedseg site worker: evaluate answered") >= 3, log[-3000:]
        assert log.count("fedseg site worker: train answered") >= 2, log[-3000:]
        assert "answering in this process" not in log


def test_resume_continues_survives_a_killed_supernode_and_readmits_it_restarted(
    loopback: Federation, first_run: tuple[Path, str]
) -> None:
    run_dir, _ = first_run
    before = history_of(run_dir)["rounds"]
    events: list[str] = []

    def kill_site_b_once_resumed_then_restart_it(line: str) -> None:
        if "resuming" in line and "killed" not in events:
            loopback.kill("site-b")
            events.append("killed")
        elif "site-1 dropped" in line and "restarted" not in events:
            loopback.procs["site-b"].wait(timeout=KILL_TIMEOUT_S)
            # Flower 1.41 refuses to activate a node (exit 305) until its old session is marked offline:
            # two missed 30 s heartbeats
            wait_for(lambda: any(n["status"] == "offline" for n in loopback.supernodes()), 120, "site-b offline")
            loopback.join("site-b", 1)  # same key: same node id
            events.append("restarted")

    overrides = {
        **TINY,
        "num-server-rounds": 8,
        "output-dir": str(loopback.root / "runs"),
        "resume-from": str(run_dir),
        "round-timeout": 40.0,
    }
    code, log = loopback.run(overrides, on_line=kill_site_b_once_resumed_then_restart_it)
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
