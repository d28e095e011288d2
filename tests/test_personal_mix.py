"""The personal model's weight in its mean with the global model (fedseg.personal_mix): the sites' choice,
the weighted mean, and the model-file fields that carry it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import Dataset

from fedseg.labels import LabelScheme
from fedseg.model_checkpoint import CheckpointError, ModelCheckpoint
from fedseg.models import build_model
from fedseg.personal_mix import (
    CANDIDATES,
    EnsembleError,
    candidate_key,
    candidate_metrics,
    choose_personal_weight,
    dice_by_candidate,
    ensemble_mean,
)
from fedseg.trainer import SegmentationTrainer

REGIONS = LabelScheme("brats", 4, region_training=True)  # WT, TC, ET: one sigmoid each
CLASSES = LabelScheme("classes", 3)  # softmax over 3 classes, 2 scored structures


def _site(scores: dict[str, list[float]]) -> dict[str, float]:
    return {candidate_key(s, w): v for s, values in scores.items() for w, v in zip(CANDIDATES, values, strict=True)}


def test_each_region_takes_the_weight_with_the_best_mean_over_the_sites() -> None:
    sites = [
        _site({"WT": [0.5, 0.6, 0.7, 0.8, 0.9], "TC": [0.9, 0.8, 0.7, 0.6, 0.5], "ET": [0.1, 0.9, 0.1, 0.1, 0.1]}),
        _site({"WT": [0.5, 0.6, 0.7, 0.8, 0.7], "TC": [0.5, 0.8, 0.7, 0.6, 0.5], "ET": [0.1, 0.1, 0.1, 0.1, 0.9]}),
    ]
    # WT: 0.8 at 0.75 and 1.0 (a tie: the smaller); TC: 0.8 at 0.25 over 0.7 at 0.0; ET: 0.5 at 0.25 and 1.0
    assert choose_personal_weight(sites, REGIONS) == (0.75, 0.25, 0.25)


def test_an_incomplete_or_impossible_set_does_not_vote_for_its_structure() -> None:
    good = _site({s: [0.1, 0.2, 0.9, 0.2, 0.1] for s in REGIONS.structures})
    votes_for_one = [0.0, 0.0, 0.0, 0.0, 1.0]
    hostile = [
        {k: v for k, v in _site({"WT": votes_for_one}).items() if not k.endswith("-0.5")},  # a candidate missing
        _site({"TC": [*votes_for_one[:4], 7.0]}),  # not a Dice
        _site({"ET": [*votes_for_one[:4], math.nan]}),
        _site({"WT": [*votes_for_one[:4], math.inf]}),
        {candidate_key("TC", w): "0.9" for w in CANDIDATES},  # not a number
    ]
    assert choose_personal_weight([good, *hostile], REGIONS) == (0.5, 0.5, 0.5)
    assert choose_personal_weight(hostile, REGIONS) is None
    assert choose_personal_weight([{}], REGIONS) is None  # FedAvg's sites send none
    # a site whose validation cases have no ET still votes for WT and TC
    no_et = _site({"WT": votes_for_one, "TC": votes_for_one})
    assert choose_personal_weight([good, no_et, no_et], REGIONS) == (1.0, 1.0, 0.5)


def test_softmax_outputs_get_one_weight_for_every_channel() -> None:
    site = _site({"1": [0.2, 0.3, 0.4, 0.9, 0.1], "2": [0.6, 0.5, 0.4, 0.3, 0.9]})
    # mean over the structures: 0.4, 0.4, 0.4, 0.6, 0.5 (neither structure's own best, 0.75 for "1", 1.0 for "2")
    assert choose_personal_weight([site], CLASSES) == (0.75,)


def test_a_sites_candidates_are_the_dice_of_each_weighted_mean() -> None:
    torch.manual_seed(0)
    shared, personal = torch.rand(2, 3, 6, 6, 6), torch.rand(2, 3, 6, 6, 6)
    label = torch.randint(0, 3, (2, 1, 6, 6, 6))
    per_case = dice_by_candidate(CLASSES, shared, personal, label)
    assert per_case.shape == (2, len(CANDIDATES), 2)
    np.testing.assert_allclose(per_case[:, 0], CLASSES.dice(shared, label).numpy())
    np.testing.assert_allclose(per_case[:, -1], CLASSES.dice(personal, label).numpy())
    np.testing.assert_allclose(per_case[:, 1], CLASSES.dice(0.25 * personal + 0.75 * shared, label).numpy())
    metrics = candidate_metrics(CLASSES, per_case)
    assert metrics[candidate_key("2", 0.25)] == pytest.approx(per_case[:, 1, 1].mean())
    assert len(metrics) == 2 * len(CANDIDATES)  # aggregate numbers only: one per structure and weight
    undefined = per_case.copy()
    undefined[:, :, 0] = np.nan  # a structure no validation case defines is left out
    assert {k for k in candidate_metrics(CLASSES, undefined) if "-1-" in k} == set()
    assert candidate_metrics(CLASSES, per_case[:0]) == {}


def test_the_mean_weighs_the_personal_model_per_channel() -> None:
    torch.manual_seed(1)
    shared, personal, third = torch.rand(3, 1, 3, 4, 4, 4)
    weight = torch.tensor([0.75, 0.25, 0.0]).view(1, 3, 1, 1, 1)
    mixed = ensemble_mean([shared, personal], [None, (0.75, 0.25, 0.0)])
    torch.testing.assert_close(mixed, weight * personal + (1 - weight) * shared)
    torch.testing.assert_close(ensemble_mean([personal, shared], [(0.5,), None]), (shared + personal) / 2)
    torch.testing.assert_close(ensemble_mean([shared, third], [None, None]), (shared + third) / 2)
    torch.testing.assert_close(ensemble_mean([shared, personal, third], [None, (1.0,), None]), personal)
    with pytest.raises(EnsembleError, match="not several"):
        ensemble_mean([shared, personal], [(0.5,), (0.5,)])
    with pytest.raises(EnsembleError, match="2 values for 3 output channels"):
        ensemble_mean([shared, personal], [None, (0.5, 0.5)])


def _model(**fields: object) -> ModelCheckpoint:
    torch.manual_seed(0)
    weights = build_model("unet", 4, 3).state_dict()
    return ModelCheckpoint(
        weights, "unet", 4, (16, 16, 16), in_channels=4, label_scheme="brats", region_training=True, **fields
    )  # type: ignore[arg-type]


def test_model_files_keep_the_weights_and_refuse_impossible_ones(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    _model(personal_weight=(0.75, 0.25, 0.0)).save(path)
    loaded = ModelCheckpoint.load(path)
    assert loaded.personal_weight == (0.75, 0.25, 0.0) and loaded.ensemble_weight is None
    assert torch.load(path, weights_only=True)["format"] == "fedseg-model/2"  # alone it changes no prediction
    _model(ensemble_weight=(0.5,)).save(path)
    assert ModelCheckpoint.load(path).ensemble_weight == (0.5,)
    data = torch.load(path, weights_only=True)
    assert data["format"] == "fedseg-model/4"  # a fedseg that would average it equally refuses it
    for bad in ([0.5, 0.5], [1.5], [-0.1, 0.2, 0.3], ["0.5"], [True], 0.5, [math.nan], {"WT": 0.5}):
        torch.save({**data, "ensemble_weight": bad}, path)
        with pytest.raises(CheckpointError, match=r"m\.pt: not a usable fedseg model file: 'ensemble_weight' must be"):
            ModelCheckpoint.load(path)
    del data["ensemble_weight"], data["personal_weight"]  # a file of an earlier fedseg: equal weights
    torch.save(data, path)
    assert ModelCheckpoint.load(path).ensemble_weight is None


def test_a_site_scores_every_weight_and_keeps_the_global_model_loaded() -> None:
    torch.manual_seed(2)
    trainer = SegmentationTrainer("unet", 3, (16, 16, 16))
    shared = trainer.get_weights()
    personal = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point() else v for k, v in shared.items()}
    cases = [
        {"image": torch.randn(1, 16, 16, 16), "label": torch.randint(0, 3, (1, 16, 16, 16)).float()} for _ in range(2)
    ]
    result = trainer.evaluate(Dataset(cases), weights=shared, personal=personal)
    per_case = result.personal_weights
    assert per_case is not None and per_case.shape == (2, len(CANDIDATES), 2)
    assert all(torch.equal(v, shared[k]) for k, v in trainer.get_weights().items())  # restored
    np.testing.assert_allclose(per_case[:, 0], result.per_case, atol=1e-6)  # weight 0: the evaluated model
    np.testing.assert_allclose(per_case[:, 0], trainer.evaluate(Dataset(cases), weights=shared).per_case, atol=1e-6)
    np.testing.assert_allclose(per_case[:, -1], trainer.evaluate(Dataset(cases), weights=personal).per_case, atol=1e-6)
    assert not np.allclose(per_case[:, 0], per_case[:, -1])  # the two models differ on these cases
