"""Experiment options on tiny synthetic sites: fine-tuning, k-fold ensembles, the privacy sweep and
personal models.

One experiment (2 sites, 1 round × 1 epoch, 16³ patches) runs once for the module; each test
checks one option's outputs. The personal models' test runs its own small experiment.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from typer.testing import CliRunner

from clients.personal import PersonalState
from fedseg.cli import app as cli
from fedseg.config import ConfigError
from fedseg.data.datasets import evaluation_dataset
from fedseg.data.synth import synthesize
from fedseg.experiments import ExperimentSpec, run_experiment
from fedseg.experiments.arms import Arm, plan_arms
from fedseg.experiments.evaluation import _test_set, evaluate
from fedseg.experiments.views import load_splits
from fedseg.federation import run_key
from fedseg.labels import LabelScheme
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.personal_mix import CANDIDATES, candidate_key
from fedseg.report.cases import CaseRow, read_cases

RUN = {
    "num-server-rounds": 1,
    "local-epochs": 1,
    "patch-size": "16,16,16",
    "batch-size": 2,
    "seed": 1,
    "learning-rate": 0.05,
}
EXPERIMENT = {
    "name": "options",
    "sites": 2,
    "outside": "",
    "arms": ["federated"],
    "strategies": ["fedavg"],
    "finetune-rounds": 1,
    "ensemble-folds": 2,
    "ensemble-arms": ["centralized"],
    "dp-sgd-noise-multipliers": [1.0],
    "dp-noised-noise-multipliers": [1.0],
}


def _spec(root: Path, **experiment: object) -> ExperimentSpec:
    values = {**EXPERIMENT, "data-dir": str(root / "data"), "output-dir": str(root / "results"), **experiment}
    return ExperimentSpec.from_mapping({"experiment": values, "run": RUN})


def _ran(
    factory: pytest.TempPathFactory, name: str, spec_in: Callable[[Path], ExperimentSpec]
) -> Iterator[tuple[ExperimentSpec, list[CaseRow]]]:
    """The experiment `spec_in(root)` run on two tiny synthetic sites in a fresh folder; its spec and rows."""
    root = factory.mktemp(name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDSEG_CACHE", str(root / "cache"))
        synthesize(root / "data", "tiny", seed=0, num_sites=2)
        spec = spec_in(root)
        run_experiment(spec, echo=lambda _: None)
        yield spec, read_cases(spec.results_dir / "cases.csv")


@pytest.fixture(scope="module")
def experiment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ExperimentSpec, list[CaseRow]]]:
    yield from _ran(tmp_path_factory, "options", _spec)


def _arm(spec: ExperimentSpec, arm_id: str) -> Path:
    return spec.results_dir / "arms" / arm_id


def _history(spec: ExperimentSpec, arm_id: str) -> dict:
    return json.loads((_arm(spec, arm_id) / "history.json").read_text())


def _weights(spec: ExperimentSpec, arm_id: str) -> dict[str, torch.Tensor]:
    return ModelCheckpoint.load(_arm(spec, arm_id) / "final-model.pt").state_dict


def test_plan_names_every_arm_of_the_options(experiment: tuple[ExperimentSpec, list[CaseRow]]) -> None:
    spec, rows = experiment
    assert [a.id for a in plan_arms(spec)] == [
        "fedavg--federation",
        "fedavg-finetuned--site-0",
        "fedavg-finetuned--site-1",
        "centralized-fold0--pooled",
        "centralized-fold1--pooled",
        "centralized-ens2--pooled",
        "fedavg-dpsgd-z1.0--federation",
        "dp-noised-z1.0--federation",
    ]
    evaluated = list(dict.fromkeys(r.model for r in rows))
    assert ("centralized-fold0", "pooled") not in evaluated  # fold submodels count only inside their ensemble
    assert len(evaluated) == 6


def test_finetuning_starts_from_the_federated_model_and_changes_it(
    experiment: tuple[ExperimentSpec, list[CaseRow]],
) -> None:
    spec, rows = experiment
    federated = _weights(spec, "fedavg--federation")
    final_round = _history(spec, "fedavg--federation")["rounds"][-1]["eval"]
    for site in ("site-0", "site-1"):
        arm_id = f"fedavg-finetuned--{site}"
        tested = sorted(r.tested_on for r in rows if r.model == ("fedavg-finetuned", site))
        assert tested == ["site-0", "site-1"]  # one row per test case of each site (tiny: 1 each)
        history = _history(spec, arm_id)
        # round 0 evaluates the starting model at this site: the federated model's Dice there
        assert history["rounds"][0]["eval"][site]["dice"] == pytest.approx(final_round[site]["dice"], abs=1e-6)
        assert list(history["rounds"][1]["train"]) == [site]  # fine-tuned at its own site only
        tuned = _weights(spec, arm_id)
        assert tuned.keys() == federated.keys()
        assert any(not torch.equal(tuned[k], federated[k]) for k in federated if federated[k].is_floating_point())


def test_ensemble_dice_is_that_of_the_fold_models_mean_probability(
    experiment: tuple[ExperimentSpec, list[CaseRow]],
) -> None:
    spec, rows = experiment
    folds = [ModelCheckpoint.load(_arm(spec, f"centralized-fold{f}--pooled") / "final-model.pt") for f in (0, 1)]
    assert any(not torch.equal(folds[0].state_dict[k], folds[1].state_dict[k]) for k in folds[0].state_dict)
    items = load_splits([spec.site_dir(0)], spec.run_config().seed)[0].test
    batch = next(iter(DataLoader(evaluation_dataset(items[:1]), batch_size=1)))
    each = [torch.softmax(m.trainer().predict_logits(batch["image"]), 1) for m in folds]
    assert not torch.allclose(each[0], each[1])
    mean = (each[0] + each[1]) / 2
    expected = LabelScheme("classes", 3).dice(mean, batch["label"])[0].numpy()
    row = next(
        r for r in rows if r.arm == "centralized-ens2" and r.tested_on == "site-0" and r.subject == items[0]["subject"]
    )
    np.testing.assert_allclose(row.dice, expected, atol=1e-6)
    # the saved overlay slice of the ensemble is the argmax of the mean probability
    overlay = np.load(next((spec.results_dir / "overlays").glob(f"site-0--{row.subject}/centralized-ens2--pooled.npz")))
    truth = batch["label"][0, 0]
    z = int((truth > 0).sum(dim=(0, 1)).argmax())
    np.testing.assert_array_equal(overlay["prediction"], mean.argmax(1)[0, ..., z].numpy())


def test_privacy_sweep_records_each_arms_final_epsilon(experiment: tuple[ExperimentSpec, list[CaseRow]]) -> None:
    spec, rows = experiment
    by_arm = {r.arm: (r.dp_kind, r.epsilon, r.delta) for r in rows}
    sites = _history(spec, "fedavg-dpsgd-z1.0--federation")["rounds"][-1]["train"]
    assert {s: m["dp-noise-multiplier"] for s, m in sites.items()} == {"site-0": 1.0, "site-1": 1.0}
    site_eps = [m["dp-epsilon"] for m in sites.values()]
    assert by_arm["fedavg-dpsgd-z1.0"] == ("sample-level", max(site_eps), 1e-5)
    assert 0 < min(site_eps) < max(site_eps)  # sites of 6 and 4 subjects: different sampling rates, different ε
    strategy = _history(spec, "dp-noised-z1.0--federation")["rounds"][-1]["strategy"]
    assert by_arm["dp-noised-z1.0"] == ("client-level", strategy["epsilon"], 1e-5) and strategy["epsilon"] > 0
    for arm in ("fedavg", "fedavg-finetuned", "centralized-ens2"):
        assert by_arm[arm][0] == "" and math.isnan(by_arm[arm][1]) and math.isnan(by_arm[arm][2])
    ledgers = sorted(
        (p.parts[-3], p.name.startswith("run-fedavg-dpsgd-z1.0--federation"))
        for p in (spec.results_dir / "site-state").glob("*/privacy/*.json")
    )
    assert ledgers == [("site-0", True), ("site-1", True)]  # one per site, inside the experiment


def test_privacy_sweep_config_is_checked_before_training(tmp_path: Path) -> None:
    spec = _spec(tmp_path, **{"dp-sgd-noise-multipliers": [0.5, 2], "dp-noised-noise-multipliers": [0.1]})
    sweep = [(a.name, a.strategy, a.params) for a in plan_arms(spec) if "-z" in a.name]
    assert sweep == [
        ("fedavg-dpsgd-z0.5", "fedavg", {"dp-sgd": True, "dp-noise-multiplier": 0.5}),
        ("fedavg-dpsgd-z2.0", "fedavg", {"dp-sgd": True, "dp-noise-multiplier": 2.0}),
        ("dp-noised-z0.1", "dp-noised", {"dp-noised.noise-multiplier": 0.1}),
    ]
    with pytest.raises(ConfigError, match=r"'dp-sgd-noise-multipliers' needs distinct noise multipliers > 0, got \[0"):
        _spec(tmp_path, **{"dp-sgd-noise-multipliers": [0]})
    with pytest.raises(ConfigError, match=r"'dp-noised-noise-multipliers' must be a list of numbers"):
        _spec(tmp_path, **{"dp-noised-noise-multipliers": "1.0"})
    with pytest.raises(ConfigError, match=r"'fedprox.proximal-mu' is 0.01 but 'dp-sgd' is on"):
        _spec(tmp_path, strategies=["fedprox"])
    with pytest.raises(ConfigError, match=r"\[run\] 'dp-sgd' must be off with a privacy sweep or the dp-noised"):
        ExperimentSpec.from_mapping(
            {
                "experiment": {"name": "x", "data-dir": "d", "sites": 2, "strategies": ["dp-noised"]},
                "run": {"dp-sgd": True, "dp-noise-multiplier": 1.0},
            }
        )


def test_an_arm_whose_own_rounds_break_a_run_value_fails_before_any_arm_trains(tmp_path: Path) -> None:
    """A fine-tuning arm trains finetune-rounds rounds: swa-rounds above that is refused for it, at the start."""
    spec = ExperimentSpec.from_mapping(
        {
            "experiment": {**EXPERIMENT, "data-dir": str(tmp_path / "absent"), "output-dir": str(tmp_path / "r")},
            "run": {**RUN, "num-server-rounds": 3, "swa-rounds": 2},
        }
    )
    with pytest.raises(ConfigError, match=r"^arm fedavg-finetuned--site-0: run-config 'swa-rounds' must be in"):
        run_experiment(spec, echo=lambda _: None)
    assert not (tmp_path / "r").exists()  # nothing claimed, nothing trained


def _personal_spec(root: Path) -> ExperimentSpec:
    """Ditto and FedBN on two tiny sites, one round."""
    experiment = {
        "name": "personal",
        "data-dir": str(root / "data"),
        "output-dir": str(root / "results"),
        "sites": 2,
        "outside": "",
        "arms": ["federated"],
        "strategies": ["ditto", "fedbn"],
    }
    return ExperimentSpec.from_mapping({"experiment": experiment, "run": {**RUN, "ditto": {"lambda": 0.01}}})


@pytest.fixture(scope="module")
def personal_experiment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ExperimentSpec, list[CaseRow]]]:
    yield from _ran(tmp_path_factory, "personal", _personal_spec)


def test_ditto_sites_report_their_personal_model_and_its_mean_with_the_global_model(
    personal_experiment: tuple[ExperimentSpec, list[CaseRow]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    spec, rows = personal_experiment
    by_arm = {arm: sorted(r.tested_on for r in rows if r.arm == arm) for arm in {r.arm for r in rows}}
    assert by_arm["ditto-personal"] == by_arm["ditto-ensemble"] == ["site-0", "site-1"]  # own cases only (1 each)
    assert by_arm["fedbn-personal"] == ["site-0", "site-1"] and "fedbn-ensemble" not in by_arm  # own layers only

    folder = spec.results_dir / "arms" / "ditto--federation"
    global_model = ModelCheckpoint.load(folder / "model.pt")
    state = PersonalState(spec.results_dir / "site-state" / "site-0", run_key(folder))
    personal = state.personal_model(global_model.state_dict)
    assert personal is not None
    items = load_splits([spec.site_dir(0)], spec.run_config().seed)[0].test
    batch = next(iter(DataLoader(evaluation_dataset(items[:1]), batch_size=1)))
    labels = global_model.labels
    trainer = global_model.trainer()
    shared = labels.probabilities(trainer.predict_logits(batch["image"]))
    trainer.set_weights(personal)
    own = labels.probabilities(trainer.predict_logits(batch["image"]))
    assert not torch.allclose(shared, own)
    row = {r.arm: r for r in rows if r.tested_on == "site-0" and r.subject == items[0]["subject"]}
    np.testing.assert_allclose(row["ditto-personal"].dice, labels.dice(own, batch["label"])[0].numpy(), atol=1e-6)
    # the personal model's weight in the mean: chosen on the sites' validation Dice (fedseg.personal_mix)
    assert global_model.personal_weight is not None and len(global_model.personal_weight) == 1  # softmax: one
    weight = global_model.personal_weight[0]
    scored = json.loads((folder / "history.json").read_text())["rounds"][-1]["eval"].values()
    means = np.mean([[site[candidate_key(s, w)] for w in CANDIDATES for s in labels.structures] for site in scored], 0)
    by_weight = means.reshape(len(CANDIDATES), len(labels.structures)).mean(1)
    assert weight == CANDIDATES[int(np.argmax(by_weight))]
    expected = labels.dice(weight * own + (1 - weight) * shared, batch["label"])[0].numpy()
    np.testing.assert_allclose(row["ditto-ensemble"].dice, expected, atol=1e-6)
    fedbn_folder = spec.results_dir / "arms" / "fedbn--federation"
    assert ModelCheckpoint.load(fedbn_folder / "model.pt").personal_weight is None  # layers, not a model: no weight
    fedbn_scored = json.loads((fedbn_folder / "history.json").read_text())["rounds"][-1]["eval"].values()
    assert not any(k.startswith("val-dice-personal-weight-") for site in fedbn_scored for k in site)
    # the experiment's mean follows the weight: all of it on the personal model gives the personal model's Dice
    only_own = dataclasses.replace(global_model, state_dict=personal, ensemble_weight=(1.0,))
    arm = Arm("x", "personal", "site-0", (0,))
    test = _test_set(spec, "site-0", False, items[:1])
    [weighted] = evaluate(
        arm, [global_model, only_own], [test], tmp_path_factory.mktemp("e"), 0, ("", math.nan, math.nan)
    )
    np.testing.assert_allclose(weighted.dice, row["ditto-personal"].dice, atol=1e-6)
    assert {row[a].kind for a in ("ditto-personal", "ditto-ensemble")} == {"personal"}
    assert row["ditto-ensemble"].trained_on == "site-0"


def _personal_model_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["site", "personal-model", *args])
    return result.exit_code, result.output


def test_a_site_exports_its_personal_model_for_predict(
    personal_experiment: tuple[ExperimentSpec, list[CaseRow]], tmp_path: Path
) -> None:
    spec, _ = personal_experiment
    state_dir = spec.results_dir / "site-state" / "site-1"
    for strategy in ("ditto", "fedbn"):
        folder = spec.results_dir / "arms" / f"{strategy}--federation"
        out = tmp_path / f"{strategy}.pt"
        code, output = _personal_model_cli(str(out), "--model", str(folder), "--state-dir", str(state_dir))
        assert code == 0, output
        global_model = ModelCheckpoint.load(folder / "model.pt")
        expected = PersonalState(state_dir, run_key(folder)).personal_model(global_model.state_dict)
        exported = ModelCheckpoint.load(out)
        assert expected is not None and exported.state_dict.keys() == expected.keys()
        assert all(torch.equal(exported.state_dict[k], expected[k]) for k in expected)
        assert any(not torch.equal(exported.state_dict[k], global_model.state_dict[k]) for k in expected)
        assert exported.labels == global_model.labels
        # Ditto's own model carries the weight the federation chose for it; FedBN's layers none
        assert exported.ensemble_weight == (global_model.personal_weight if strategy == "ditto" else None)
        assert exported.personal_weight is None


def test_personal_model_export_refuses_what_it_cannot_use_in_one_line(
    personal_experiment: tuple[ExperimentSpec, list[CaseRow]], tmp_path: Path
) -> None:
    spec, _ = personal_experiment
    model = spec.results_dir / "arms" / "ditto--federation" / "model.pt"
    state_dir = spec.results_dir / "site-state" / "site-0"
    runs = sorted(p.name for p in (state_dir / "personal").iterdir())
    refused = {
        "two runs kept, none named": ("--model", str(model), "--state-dir", str(state_dir)),
        "no state": ("--model", str(model), "--state-dir", str(tmp_path / "nothing")),
        "unknown run": ("--model", str(model), "--state-dir", str(state_dir), "--run", "no-such-run"),
        "neither folder": ("--model", str(model)),
        "a path for a run": ("--model", str(model), "--state-dir", str(state_dir), "--run", "../../site-1"),
    }
    expected = {
        "two runs kept, none named": f"personal models of 2 runs; choose one with --run: {', '.join(runs)}",
        "no state": "no personal model (FedBN, FedPer or Ditto) kept in this state dir",
        "unknown run": "no personal model (FedBN, FedPer or Ditto) kept for run 'no-such-run'",
        "neither folder": "give --state-dir, or --data-dir",
        "a path for a run": "a run key is a folder name under <state-dir>/personal, not a path",
    }
    for case, args in refused.items():
        code, output = _personal_model_cli(str(tmp_path / f"{case}.pt"), *args)
        assert code == 2 and output.startswith("error: ") and output.count("\n") == 1, (case, output)
        assert expected[case] in output, (case, output)
        assert not (tmp_path / f"{case}.pt").exists()
    # a tampered personal model: unreadable bytes, then a tensor of the wrong shape
    ditto_run = next(r for r in runs if r.startswith("ditto"))
    hostile = tmp_path / "state"
    shutil.copytree(state_dir / "personal" / ditto_run, hostile / "personal" / ditto_run)
    target = hostile / "personal" / ditto_run / "ditto-personal.pt"
    target.write_bytes(b"\x80\x04not a torch file")
    code, output = _personal_model_cli(str(tmp_path / "a.pt"), "--model", str(model), "--state-dir", str(hostile))
    assert code == 2 and f"{target}: unreadable" in output and output.count("\n") == 1, output
    weights = {k: v.clone() for k, v in ModelCheckpoint.load(model).state_dict.items()}
    first = next(iter(weights))
    weights[first] = torch.zeros(3, 3)
    torch.save({"round": 1, "current": weights, "previous": None}, target)
    code, output = _personal_model_cli(str(tmp_path / "b.pt"), "--model", str(model), "--state-dir", str(hostile))
    assert code == 2 and "does not fit" in output and first in output and output.count("\n") == 1, output
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists()
