"""The example plugin package (examples/fedseg-trimmed-mean, a trimmed mean weighted by examples):
installed, listed, its arithmetic checked, and run through `flwr run`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_RUN, installed_example, read_history
from scipy.stats import trim_mean
from strategy_replies import as_numpy, instructions, reply, task_identity  # noqa: F401 - fixture
from typer.testing import CliRunner

from fedseg.cli import app as cli
from fedseg.config import RunConfig
from strategies.registry import build_strategy, installed_names


@pytest.fixture(scope="module")
def plugin_installed() -> Iterator[None]:
    """The example plugin, pip-installed for this module."""
    with installed_example("fedseg-trimmed-mean"):
        yield


pytestmark = pytest.mark.usefixtures("plugin_installed")


def test_plugin_is_found_by_name_and_its_parameters_are_checked() -> None:
    assert "trimmed-mean" in installed_names()
    strategy = build_strategy(RunConfig.from_mapping({"strategy": "trimmed-mean", "trimmed-mean.trim-fraction": 0.3}))
    assert type(strategy).__name__ == "TrimmedMean" and strategy.trim_fraction == 0.3
    with pytest.raises(
        ValueError,
        match=r"'trimmed-mean.trim-fraction' must be <= 0.49, got 0.7; valid parameters: "
        r"trimmed-mean.max-update-ratio .*trimmed-mean.trim-fraction",
    ):
        build_strategy(RunConfig.from_mapping({"strategy": "trimmed-mean", "trimmed-mean.trim-fraction": 0.7}))
    listing = CliRunner().invoke(cli, ["strategies"]).output
    assert "trimmed-mean (plugin fedseg_trimmed_mean:TrimmedMean)" in listing
    assert "trimmed-mean.trim-fraction  float, default 0.2, in [0, 0.49]" in listing


def aggregate(trim: float, values: list[np.ndarray], examples: list[int]) -> tuple[dict[str, np.ndarray], dict]:
    """The plugin's model from sites sending `w` = values[i] with examples[i] training examples."""
    strategy = build_strategy(
        RunConfig.from_mapping(
            {"strategy": "trimmed-mean", "min-sites": len(values), "trimmed-mean.trim-fraction": trim}
        )
    )
    global_state = {"w": np.zeros(values[0].shape, np.float32), "n": np.array(3, np.int64)}
    sent = instructions(strategy, global_state, list(range(1, len(values) + 1)))
    replies = [
        reply(sent[node], {"w": v.astype(np.float32), "n": np.array(9, np.int64)}, num_examples=n, site_id=i)
        for i, (node, v, n) in enumerate(zip(sent, values, examples, strict=True))
    ]
    return as_numpy(strategy.aggregate_train(1, replies)[0]), strategy.round_report(1)


@pytest.mark.usefixtures("task_identity")
def test_trimmed_mean_cuts_a_share_of_the_weight() -> None:
    values = [np.full(6, v) for v in (1.0, 2.0, 3.0, 4.0, 20.0)]  # one site far off
    result, report = aggregate(0.2, values, [1, 1, 1, 1, 1])
    np.testing.assert_allclose(result["w"], np.full(6, 3.0))  # equal weights: mean of 2, 3, 4 (plain mean: 6)
    assert result["w"].dtype == np.float32 and result["n"] == 3 and result["n"].dtype == np.int64
    # the small outlying site (1/9 of the examples < 0.2) is cut entirely, and 0.2 of the weight at the low end
    result, report = aggregate(0.2, values, [2, 2, 2, 2, 1])
    kept = [2 / 9 - 0.2, 2 / 9, 2 / 9, 0.8 - 6 / 9]  # of the sites sending 1, 2, 3, 4
    np.testing.assert_allclose(
        result["w"], np.full(6, (1 * kept[0] + 2 * kept[1] + 3 * kept[2] + 4 * kept[3]) / 0.6), rtol=1e-6
    )
    assert report["weights"]["site-4"] == pytest.approx(1 / 9) and report["trim-fraction"] == 0.2
    # a site with half the examples cannot be trimmed away: it keeps (0.8 − 0.5) / 0.6 of the weight
    result, _ = aggregate(0.2, values, [1, 1, 1, 1, 4])
    np.testing.assert_allclose(result["w"], np.full(6, (2 * 0.05 + 3 * 0.125 + 4 * 0.125 + 20 * 0.3) / 0.6), rtol=1e-6)


@pytest.mark.usefixtures("task_identity")
def test_integer_weights_equal_the_plain_trimmed_mean_of_repeated_sites() -> None:
    rng = np.random.default_rng(7)
    values = [rng.standard_normal(50) for _ in range(5)]
    examples = [3, 1, 2, 1, 3]  # 10 examples: a trim fraction of 0.2 cuts exactly 2 at each end
    result, _ = aggregate(0.2, values, examples)
    repeated = np.repeat(np.stack(values), examples, axis=0)
    np.testing.assert_allclose(result["w"], trim_mean(repeated, 0.2, axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(result["w"], trim_mean(np.stack(values), 0.2, axis=0), rtol=1e-3)  # ≠ FedTrimmedAvg


def test_plugin_runs_end_to_end_through_flwr_run(tmp_path: Path, flwr_run) -> None:
    output = tmp_path / "runs"
    run = {
        **TINY_RUN,
        "synthetic-subjects": 4,
        "local-epochs": 1,
        "num-server-rounds": 2,
        "strategy": "trimmed-mean",
        "output-dir": str(output),
    }
    result = flwr_run(run, num_supernodes=2)
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(output, result)
    assert history["config"]["strategy"] == "trimmed-mean"
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for record in rounds[1:]:
        assert record["strategy"]["dropped-replies"] == [] and record["strategy"]["trim-fraction"] == 0.2
        assert set(record["strategy"]["weights"]) == {"site-0", "site-1"}
        assert sum(record["strategy"]["weights"].values()) == pytest.approx(1.0)
    assert set(rounds[-1]["eval"]) == {"site-0", "site-1"}
    assert all(0.0 <= site["dice"] <= 1.0 for site in rounds[-1]["eval"].values())
