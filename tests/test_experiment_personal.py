"""Personal models in an experiment: each site's Ditto model, and its mean with the global model, are
tested on that site's own cases (rows `ditto-personal`, `ditto-ensemble`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader

from clients.personal import PersonalState
from fedseg.data.datasets import evaluation_dataset
from fedseg.data.synth import synthesize
from fedseg.experiments import ExperimentSpec, run_experiment
from fedseg.experiments.views import load_splits
from fedseg.federation import run_key
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.report.cases import read_cases

RUN = {
    "num-server-rounds": 1,
    "local-epochs": 1,
    "patch-size": "16,16,16",
    "batch-size": 2,
    "seed": 1,
    "learning-rate": 0.05,
    "ditto": {"lambda": 0.01},
}


def test_ditto_sites_report_their_personal_model_and_its_mean_with_the_global_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path / "cache"))
    synthesize(tmp_path / "data", "tiny", seed=0, num_sites=2)
    experiment = {
        "name": "personal",
        "data-dir": str(tmp_path / "data"),
        "output-dir": str(tmp_path / "results"),
        "sites": 2,
        "outside": "",
        "arms": ["federated"],
        "strategies": ["ditto", "fedbn"],
    }
    spec = ExperimentSpec.from_mapping({"experiment": experiment, "run": RUN})
    run_experiment(spec, echo=lambda _: None)
    rows = read_cases(spec.results_dir / "cases.csv")
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
    expected = labels.dice((shared + own) / 2, batch["label"])[0].numpy()
    np.testing.assert_allclose(row["ditto-ensemble"].dice, expected, atol=1e-6)
    assert {row[a].kind for a in ("ditto-personal", "ditto-ensemble")} == {"personal"}
    assert row["ditto-ensemble"].trained_on == "site-0"
