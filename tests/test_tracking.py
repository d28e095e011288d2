"""Tracking: a run with `tracking = "tensorboard,mlflow"` leaves TensorBoard event files and an MLflow run
holding the run config and every round's per-site metrics, equal to history.json."""

from __future__ import annotations

from pathlib import Path

import pytest
from inprocess_grid import InProcessGrid, task_identity, tiny_config  # noqa: F401 (fixture)
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedseg.config import ConfigError, RunConfig
from fedseg.data.synth import synthesize
from fedseg.experiments import ExperimentSpec, run_experiment
from fedseg.federation import Federation
from fedseg.server_app import initial_weights
from fedseg.tracking import backends, open_run_tracker
from fedseg.tracking.mlflow_tracker import RUN_TAG, tracking_uri
from strategies.registry import build_strategy


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _tracked_run(tmp_path: Path, values: dict) -> tuple[Path, dict]:
    config = RunConfig.from_mapping(values)
    run_dir = tmp_path / "runs" / "run-a"
    grid = InProcessGrid(values, num_sites=2)
    federation = Federation(grid, build_strategy(config), config, run_dir, open_run_tracker(config, run_dir))
    _, history = federation.run(initial_weights(federation.config))
    return run_dir, history.to_dict()


@pytest.mark.usefixtures("task_identity")
def test_tensorboard_and_mlflow_get_config_and_per_site_rounds(tmp_path: Path) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 1, "tracking": "tensorboard,mlflow"})
    run_dir, history = _tracked_run(tmp_path, values)
    rounds = history["rounds"]

    scalars = _scalars(tmp_path / "runs" / "tensorboard" / "run-a")
    assert [step for step, _ in scalars["federation/mean-dice"]] == [0, 1]
    assert scalars["federation/mean-dice"][1][1] == pytest.approx(rounds[1]["mean_dice"])
    for site in ("site-0", "site-1"):
        assert scalars[f"{site}/eval/dice"][1][1] == pytest.approx(rounds[1]["eval"][site]["dice"])
        assert scalars[f"{site}/train/train-loss"] == [(1, pytest.approx(rounds[1]["train"][site]["train-loss"]))]
    assert not any(tag.endswith("site-id") for tag in scalars)

    client = MlflowClient(tracking_uri(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("fedseg").experiment_id])
    assert run.info.run_name == "run-a" and run.data.tags[RUN_TAG] == "run-a"
    assert run.info.status == "FINISHED"
    assert run.data.params["strategy"] == "fedavg" and run.data.params["tracking"] == "tensorboard,mlflow"
    dice = client.get_metric_history(run.info.run_id, "site-1/eval/dice")
    expected = [(r["round"], pytest.approx(r["eval"]["site-1"]["dice"])) for r in rounds]
    assert [(m.step, m.value) for m in dice] == expected
    assert (run_dir / "history.json").is_file()


@pytest.mark.usefixtures("task_identity")
def test_tracking_off_writes_nothing_and_a_missing_package_fails_before_round_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _tracked_run(tmp_path, tiny_config(tmp_path, **{"num-server-rounds": 1}))
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["run-a"]

    with pytest.raises(ConfigError, match="'tracking': unknown tracking backend 'wandb'; choose from: tensorboard"):
        RunConfig.from_mapping(tiny_config(tmp_path, tracking="tensorboard,wandb"))
    monkeypatch.setitem(backends.BACKENDS, "mlflow", (backends.BACKENDS["mlflow"][0], ("fedseg_absent_package",)))
    config = RunConfig.from_mapping(tiny_config(tmp_path, tracking="mlflow"))
    with pytest.raises(
        ConfigError,
        match=r"'tracking' is 'mlflow' but fedseg_absent_package is not installed .*"
        r"pip install 'fedseg\[tracking\]'",
    ):
        open_run_tracker(config, tmp_path / "runs" / "run-b")
    assert not (tmp_path / "runs" / "run-b").exists()


def test_experiment_arms_are_runs_of_one_mlflow_experiment(tmp_path: Path) -> None:
    synthesize(tmp_path / "data", "tiny", seed=0, num_sites=2)
    run = {
        "num-server-rounds": 1,
        "local-epochs": 1,
        "patch-size": "16,16,16",
        "batch-size": 2,
        "seed": 1,
        "tracking": "mlflow,tensorboard",
    }
    experiment = {
        "name": "tracked",
        "data-dir": str(tmp_path / "data"),
        "sites": 2,
        "output-dir": str(tmp_path / "results"),
        "arms": ["federated"],
        "strategies": ["fedavg", "fedprox"],
    }
    spec = ExperimentSpec.from_mapping({"experiment": experiment, "run": run})
    results = run_experiment(spec, echo=lambda line: None)
    client = MlflowClient(tracking_uri(results))
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    arms = sorted(p.name for p in (results / "arms").iterdir())
    assert sorted(r.info.run_name for r in runs) == arms and len(arms) == 2  # one federated arm per strategy
    assert all(r.info.status == "FINISHED" and "federation/mean-dice" in r.data.metrics for r in runs)
    assert sorted(p.name for p in (results / "tensorboard").iterdir()) == arms
    # tracking does not change what an arm computes: the experiment continues without it (arms skipped)
    untracked = ExperimentSpec.from_mapping(
        {"experiment": experiment, "run": {k: v for k, v in run.items() if k != "tracking"}}
    )
    lines: list[str] = []
    assert run_experiment(untracked, echo=lines.append) == results
    assert sum("finished earlier, skipped" in line for line in lines) == 2
