"""Secure aggregation in deployment on loopback: SuperLink + 3 SuperNodes, TLS and node authentication.

Started through fedseg's own commands (`fedseg server`, `fedseg site join`) from a snapshot of the
app, on 127.0.0.1 and free ports, with a private FLWR_HOME (tests/loopback.py). Two secure rounds;
one SuperNode is killed while round 2 trains: the round completes from the other two sites' masked
updates (the killed site's pairwise masks are rebuilt from the survivors' shares), and no site ever
sent its weights in the clear (the server log names the masked sums only).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from loopback import TINY, Federation, history_of, new_federation

from fedseg.deploy.certs import make_certs
from fedseg.deploy.launch import connection_toml

CONNECTION = "fedseg-secagg"
SITES = ("site-a", "site-b", "site-c")


@pytest.fixture(scope="module")
def three_sites() -> Iterator[Federation]:
    fed = new_federation(CONNECTION, host="127.0.0.1")
    try:
        certs = make_certs(fed.root / "certs", ["127.0.0.1", "localhost"], list(SITES))
        (fed.root / "flwr-home" / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            + connection_toml(CONNECTION, f"127.0.0.1:{fed.port}", certs.ca_cert)
        )
        fed.serve("--host", "127.0.0.1")
        for site_id, name in enumerate(SITES):
            fed.register(name)
            fed.join(name, site_id)
        yield fed
    finally:
        fed.close()


def test_secure_rounds_over_tls_recover_a_site_killed_while_training(three_sites: Federation) -> None:
    killed: list[str] = []

    def kill_site_c_in_round_2_training(line: str) -> None:
        if "secure aggregation: round 2:" in line and "train and mask" in line and not killed:
            three_sites.kill("site-c")
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
