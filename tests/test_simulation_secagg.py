"""End to end: `flwr run .` with secure-aggregation = true trains across 3 simulated sites like plain FedAvg.

Flower's simulation engine keeps each node's Context between the four messages of a secure round;
the server log shows every round unmasked from all three sites. (The demo's Dice with and without
secure aggregation: bench/RESULTS.md §6.)
"""

from __future__ import annotations

from pathlib import Path

from conftest import TINY_RUN, read_history


def test_three_site_secure_simulation_improves_dice(tmp_path: Path, flwr_run) -> None:
    output = tmp_path / "runs"
    result = flwr_run(
        {**TINY_RUN, "num-server-rounds": 2, "output-dir": str(output), "min-sites": 3, "secure-aggregation": True},
        num_supernodes=3,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    assert "round 1 summed 3 site(s)" in log and "round 2 summed 3 site(s)" in log, log
    rounds = read_history(output, result)["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert set(rounds[-1]["train"]) == {"site-0", "site-1", "site-2"} and rounds[-1]["failures"] == []
    assert rounds[-1]["mean_dice"] > rounds[0]["mean_dice"] + 0.1  # as the plain two-site simulation test
