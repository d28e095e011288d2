"""The example plugin package (examples/fedseg-trimmed-mean): installed, listed, and run through `flwr run`."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_RUN, flwr_run, read_history
from strategy_replies import as_numpy, instructions, reply, task_identity  # noqa: F401 - fixture
from typer.testing import CliRunner

from fedseg.cli import app as cli
from fedseg.config import RunConfig
from strategies.registry import build_strategy, installed_names

PLUGIN = REPO / "examples" / "fedseg-trimmed-mean"


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def plugin_installed() -> Iterator[None]:
    """pip-install the example plugin (editable, no dependencies) for this module; uninstall if we did."""
    try:
        version("fedseg-trimmed-mean")
        already = True
    except PackageNotFoundError:
        already = False
        _pip("install", "--no-deps", "--no-build-isolation", "-e", str(PLUGIN))
    sys.path.insert(0, str(PLUGIN))  # the editable install's path hook is only read at interpreter start
    yield
    sys.path.remove(str(PLUGIN))
    if not already:
        _pip("uninstall", "-y", "fedseg-trimmed-mean")


pytestmark = pytest.mark.usefixtures("plugin_installed")


def test_plugin_is_found_by_name_and_its_parameters_are_checked() -> None:
    assert "trimmed-mean" in installed_names()
    strategy = build_strategy(RunConfig.from_mapping({"strategy": "trimmed-mean", "trimmed-mean.trim-fraction": 0.3}))
    assert type(strategy).__name__ == "TrimmedMean" and strategy.trim_fraction == 0.3
    with pytest.raises(ValueError, match=r"'trimmed-mean.trim-fraction' must be <= 0.49, got 0.7; valid parameters: "
                                         r"trimmed-mean.max-update-ratio .*trimmed-mean.trim-fraction"):
        build_strategy(RunConfig.from_mapping({"strategy": "trimmed-mean", "trimmed-mean.trim-fraction": 0.7}))
    listing = CliRunner().invoke(cli, ["strategies"]).output
    assert "trimmed-mean (plugin fedseg_trimmed_mean:TrimmedMean)" in listing
    assert "trimmed-mean.trim-fraction  float, default 0.2, in [0, 0.49]" in listing


@pytest.mark.usefixtures("task_identity")
def test_trimmed_mean_ignores_an_outlying_site() -> None:
    strategy = build_strategy(RunConfig.from_mapping({"strategy": "trimmed-mean", "min-sites": 5,
                                                      "trimmed-mean.trim-fraction": 0.2}))
    global_state = {"w": np.zeros(6, np.float32), "n": np.array(3, np.int64)}
    values = [1.0, 2.0, 3.0, 4.0, 20.0]  # one site far off
    sent = instructions(strategy, global_state, [1, 2, 3, 4, 5])
    replies = [reply(sent[node], {"w": np.full(6, v, np.float32), "n": np.array(9, np.int64)}, num_examples=2)
               for node, v in zip(sent, values, strict=True)]
    result = as_numpy(strategy.aggregate_train(1, replies)[0])
    np.testing.assert_allclose(result["w"], np.full(6, 3.0))  # mean of 2, 3, 4 (plain mean: 6)
    assert result["w"].dtype == np.float32 and result["n"] == 3 and result["n"].dtype == np.int64


def test_plugin_runs_end_to_end_through_flwr_run(tmp_path: Path) -> None:
    output = tmp_path / "runs"
    run = {**TINY_RUN, "synthetic-subjects": 4, "local-epochs": 1, "num-server-rounds": 2,
           "strategy": "trimmed-mean", "output-dir": str(output)}
    result = flwr_run(run, num_supernodes=2)
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(output)
    assert history["config"]["strategy"] == "trimmed-mean"
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert [r["strategy"] for r in rounds[1:]] == [{"dropped-replies": [], "trim-fraction": 0.2}] * 2
    assert set(rounds[-1]["eval"]) == {"site-0", "site-1"}
    assert all(0.0 <= site["dice"] <= 1.0 for site in rounds[-1]["eval"].values())
