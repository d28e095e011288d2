"""fedseg experiment end to end on tiny synthetic sites: arms, cases.csv, resume, LocalGrid vs client."""

from __future__ import annotations

import json
import math
import platform
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.config import ConfigError
from fedseg.data.synth import synthesize
from fedseg.experiments import ExperimentError, ExperimentSpec, run_experiment
from fedseg.report.cases import read_cases

RUN = {"num-server-rounds": 1, "local-epochs": 1, "patch-size": "16,16,16", "batch-size": 2, "seed": 1}


class Interrupted(Exception):
    """Stands for Ctrl-C while an arm runs."""


def _spec(tmp_path: Path, **experiment: object) -> ExperimentSpec:
    values = {
        "name": "tiny",
        "data-dir": str(tmp_path / "data"),
        "sites": 2,
        "output-dir": str(tmp_path / "results"),
        "arms": ["private", "federated"],
        "strategies": ["fedavg"],
        **experiment,
    }
    return ExperimentSpec.from_mapping({"experiment": values, "run": RUN})


def _interrupt_at(prefix: str, log: list[str]):
    def echo(line: str) -> None:
        log.append(line)
        if line.startswith(prefix):
            raise Interrupted(line)

    return echo


def test_experiment_runs_resumes_and_matches_the_clients_evaluation(tmp_path: Path) -> None:
    synthesize(tmp_path / "data", "tiny", seed=0, num_sites=2)
    spec = _spec(tmp_path)
    first: list[str] = []
    with pytest.raises(Interrupted):
        run_experiment(spec, echo=_interrupt_at("[2/3]", first))
    results = spec.results_dir
    early = read_cases(results / "cases.csv")
    assert {(r.arm, r.trained_on) for r in early} == {("private", "site-0")}
    counts = {name: sum(r.tested_on == name for r in early) for name in ("site-0", "site-1", "outside")}
    assert counts == {"site-0": 1, "site-1": 1, "outside": 4}  # tiny sites: 6 and 4 subjects, 1 test each; outside 4
    assert all(r.outside == (r.tested_on == "outside") for r in early)

    again: list[str] = []
    run_experiment(spec, echo=again.append)
    assert again[0] == "[1/3] private--site-0: finished earlier, skipped"
    assert sum("finished earlier" in line for line in again) == 1
    rows = read_cases(results / "cases.csv")
    models = list(dict.fromkeys((r.arm, r.trained_on) for r in rows))
    assert models == [("private", "site-0"), ("private", "site-1"), ("fedavg", "federation")]
    assert [r for r in rows if r.trained_on == "site-0"] == early  # the finished arm was not trained again
    for arm in ("private--site-0", "fedavg--federation"):  # each arm records the software it ran with
        software = json.loads((results / "arms" / arm / "arm.json").read_text())["software"]
        assert software["torch"] == version("torch") and software["monai"] == version("monai")
        assert software["flwr"] == version("flwr") and software["python"] == platform.python_version()
    assert all(len(r.dice) == 2 and all(0.0 <= d <= 1.0 for d in r.dice if not math.isnan(d)) for r in rows)

    # The ClientApp's own evaluation (history.json, last round) of the final federated model, reached
    # through the LocalGrid, equals the runner's per-case evaluation of the same model on that site.
    history = json.loads((results / "arms" / "fedavg--federation" / "history.json").read_text())
    for site in ("site-0", "site-1"):
        per_case = np.array([r.dice for r in rows if r.arm == "fedavg" and r.tested_on == site])
        expected = np.mean(np.nan_to_num(np.nanmean(per_case, axis=0), nan=0.0))
        assert history["rounds"][-1]["eval"][site]["dice"] == pytest.approx(expected, abs=1e-6)

    with pytest.raises(ExperimentError, match=r"different experiment config \(changed: strategies\).*appended"):
        run_experiment(_spec(tmp_path, strategies=["fedprox"]), echo=again.append)
    # A strategy appended to the list adds its arm; the finished ones stay (stopped before any training here)
    grown: list[str] = []
    with pytest.raises(Interrupted):
        run_experiment(_spec(tmp_path, strategies=["fedavg", "fedprox"]), echo=_interrupt_at("[4/4]", grown))
    assert grown[0].endswith("values appended to strategies; finished arms are kept, the new ones run")
    assert grown[1:] == [
        "[1/4] private--site-0: finished earlier, skipped",
        "[2/4] private--site-1: finished earlier, skipped",
        "[3/4] fedavg--federation: finished earlier, skipped",
        "[4/4] fedprox--federation: fedprox, 1 round(s) × 1 epoch(s) on 2 node(s)",
    ]
    assert json.loads((results / "experiment.json").read_text())["strategies"] == ["fedavg", "fedprox"]


def test_bad_experiment_config_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'arms' has \['federal'\]; choose from: private, centralized"):
        _spec(tmp_path, arms=["federal"])
    with pytest.raises(ConfigError, match=r"\[run\] key\(s\) \['strategy'\] are set by the experiment"):
        ExperimentSpec.from_mapping(
            {"experiment": {"name": "x", "data-dir": "d", "sites": 2}, "run": {"strategy": "a"}}
        )
    with pytest.raises(ConfigError, match="installed strategies"):
        _spec(tmp_path, strategies=["fedmagic"])
    spec = _spec(tmp_path)
    spec.results_dir.mkdir(parents=True)
    for junk, fault in (
        ("[" * 100_000, "not a readable JSON record"),
        ("{", "not a readable"),
        ("[1]", "not a JSON object"),
    ):
        (spec.results_dir / "experiment.json").write_text(junk)
        with pytest.raises(ExperimentError, match=f"experiment.json: {fault}"):
            run_experiment(spec, echo=lambda _: None)


def test_seed_option_runs_the_study_at_another_seed_in_its_own_folder(tmp_path: Path) -> None:
    synthesize(tmp_path / "data", "tiny", seed=0, num_sites=2)
    config = tmp_path / "tiny.toml"
    config.write_text(
        f'[experiment]\nname = "tiny"\ndata-dir = "{tmp_path / "data"}"\nsites = 2\n'
        f'output-dir = "{tmp_path / "results"}"\narms = ["centralized"]\n[run]\n'
        + "".join(f"{key} = {json.dumps(value)}\n" for key, value in RUN.items())
    )
    own = ExperimentSpec.from_toml(config)
    assert own.with_seed(RUN["seed"]) == own  # the config's own seed is the same run, in the same folder
    runner = CliRunner()
    result = runner.invoke(app, ["experiment", str(config), "--seed", "5"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "results" / "tiny-seed5" / "cases.csv").is_file()
    assert not (tmp_path / "results" / "tiny").exists()
    recorded = json.loads((tmp_path / "results" / "tiny-seed5" / "experiment.json").read_text())
    assert recorded["name"] == "tiny-seed5" and recorded["run"]["seed"] == 5
    result = runner.invoke(
        app, ["retest", str(config), str(tmp_path / "data" / "outside"), "--out", str(tmp_path / "r"), "--seed", "7"]
    )
    assert result.exit_code != 0 and "tiny-seed7" in result.output  # retest looks for the seed's own results
    result = runner.invoke(app, ["experiment", str(config), "--seed", "-1"], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --seed -1: run-config 'seed' must be >= 0, got -1"]
