"""End to end: DP-SGD sites in a `flwr run` simulation report growing ε, and stop at their budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import read_history

from fedseg.config import RunConfig
from fedseg.data.sites import load_site_split, site_dir_for
from fedseg.privacy import epsilon_of

RUN = {
    "synthetic-size": 24,
    "synthetic-subjects": 4,
    "patch-size": "16,16,16",
    "batch-size": 1,
    "local-epochs": 1,
    "learning-rate": 0.01,
    "num-server-rounds": 3,
    "dp-sgd": True,
    "dp-noise-multiplier": 1.0,
    "dp-max-grad-norm": 1.0,
    "dp-delta": 1e-5,
}


def test_dp_sgd_sites_report_epsilon_and_stop_at_budget(tmp_path: Path, flwr_run) -> None:
    config = RunConfig.from_mapping(RUN)
    subjects = {len(load_site_split(site_dir_for(config, i), seed=config.seed).train) for i in range(2)}
    assert len(subjects) == 1, "both sites hold the same number of training subjects"
    steps = math.ceil(subjects.pop() / config.batch_size)  # DP-SGD steps per local epoch, Poisson rate 1/steps

    def expected(rounds: int) -> float:
        return epsilon_of([(1.0, 1 / steps, rounds * steps)], 1e-5)

    budget = (expected(2) + expected(3)) / 2  # rounds 1 and 2 fit in it, round 3 would not
    output = tmp_path / "runs"
    result = flwr_run({**RUN, "dp-target-epsilon": budget, "output-dir": str(output)}, num_supernodes=2)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log
    rounds = read_history(output, result)["rounds"]

    for server_round in (1, 2):
        train = rounds[server_round]["train"]
        assert set(train) == {"site-0", "site-1"}
        for metrics in train.values():
            assert metrics["dp-epsilon"] == pytest.approx(expected(server_round), rel=1e-9)
            assert metrics["dp-delta"] == 1e-5 and metrics["dp-noise-multiplier"] == 1.0
    assert rounds[2]["train"]["site-0"]["dp-epsilon"] > rounds[1]["train"]["site-0"]["dp-epsilon"]

    final = rounds[3]
    assert final["train"] == {}
    assert sorted(f["site"] for f in final["failures"]) == ["site-0", "site-1"]
    assert all("> dp-target-epsilon" in f["reason"] for f in final["failures"])
    assert set(final["eval"]) == {"site-0", "site-1"}  # stopped sites still evaluate the global model
    assert f"sample-level DP-SGD, site-1: ε = {expected(2):.2f} at δ = 1e-05; protects each training subject" in log
    assert "site-0 stopped training in round 3: privacy budget reached" in log
