"""BraTS enhancing-tumour post-processing: the rule, its scoring at every candidate, the server's choice from
the sites' aggregate replies, the model file that keeps it, and a federation that chooses and stores it."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN
from hypothesis import given, settings
from hypothesis import strategies as st
from inprocess_grid import InProcessGrid, run_federation, task_identity
from test_message_audit import ALLOWED_METRIC

from fedseg.config import ConfigError, RunConfig
from fedseg.data.datalist import load_datalist
from fedseg.data.synth import synthesize
from fedseg.enhancing import (
    CANDIDATES,
    candidate_key,
    candidate_metrics,
    choose_min_voxels,
    enhancing_dice_by_candidate,
    smallest_threshold,
)
from fedseg.labels import LabelScheme
from fedseg.model_checkpoint import CheckpointError, ModelCheckpoint
from fedseg.models import build_model
from fedseg.predict import on_input_grid, predict

__all__ = ["task_identity"]  # the fixture

BRATS_RUN = {**TINY_RUN, "synthetic-anatomy": "brain", "label-scheme": "brats", "num-classes": 4}


def _region_probabilities(label: torch.Tensor) -> torch.Tensor:
    """Sigmoid outputs (WT, TC, ET) that decode exactly to `label` (training values, ET = 3)."""
    wt, tc, et = label > 0, (label == 1) | (label == 3), label == 3
    return torch.cat([wt, tc, et], dim=1).float() * 0.8 + 0.1


def _tumour(enhancing_voxels: int) -> torch.Tensor:
    """(1, 1, 8, 8, 8): an edema block around a core block holding `enhancing_voxels` enhancing voxels."""
    label = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    label[..., 1:7, 1:7, 1:7] = 2
    label[..., 2:6, 2:6, 2:6] = 1
    label.view(-1)[torch.nonzero(label.view(-1) == 1)[:enhancing_voxels, 0]] = 3
    return label


@pytest.mark.parametrize("region_training", [True, False])
def test_a_small_enhancing_prediction_becomes_core_and_whole_tumour_and_core_stay(region_training: bool) -> None:
    predicted = torch.cat([_tumour(5), _tumour(20)])
    if region_training:
        probabilities = _region_probabilities(predicted)
    else:
        probabilities = torch.nn.functional.one_hot(predicted[:, 0], 4).permute(0, 4, 1, 2, 3).float()
    plain = LabelScheme("brats", 4, region_training)
    processed = LabelScheme("brats", 4, region_training, enhancing_min_voxels=8)
    assert torch.equal(plain.label_map(probabilities), predicted)
    after = processed.label_map(probabilities)
    assert int((after[0] == 3).sum()) == 0 and int((after[0] == 1).sum()) == int((predicted[0] == 1).sum()) + 5
    assert torch.equal(after[1], predicted[1])  # 20 voxels >= 8: kept
    before_masks, after_masks = plain.masks(predicted), processed.masks(after)
    assert torch.equal(before_masks[:, :2], after_masks[:, :2])  # WT and TC unchanged


def test_dice_at_each_candidate_equals_scoring_with_that_threshold() -> None:
    generator = torch.Generator().manual_seed(0)
    truth = torch.cat([_tumour(0), _tumour(3), _tumour(40), _tumour(0)])
    predicted = torch.cat([_tumour(6), _tumour(2), _tumour(33), _tumour(0)])
    probabilities = _region_probabilities(predicted) + 0.05 * torch.rand(predicted.shape, generator=generator)
    scheme = LabelScheme("brats", 4, True)
    table = enhancing_dice_by_candidate(scheme, probabilities, truth)
    assert table.shape == (4, len(CANDIDATES))
    for column, threshold in enumerate(CANDIDATES):
        expected = LabelScheme("brats", 4, True, threshold).dice(probabilities, truth)[:, 2].numpy()
        np.testing.assert_allclose(table[:, column], expected, err_msg=f"threshold {threshold}")
    # the low-grade case (no ET in truth, 6 predicted) goes 0 → 1 at 8 voxels; the 3-voxel case loses its ET
    assert table[0, CANDIDATES.index(4)] == 0.0 and table[0, CANDIDATES.index(8)] == 1.0
    assert table[1, CANDIDATES.index(2)] > 0.5 and table[1, CANDIDATES.index(4)] == 0.0
    metrics = candidate_metrics(table)
    assert metrics[candidate_key(8)] == pytest.approx(table[:, CANDIDATES.index(8)].mean())


def test_the_server_takes_the_best_mean_over_sites_and_the_smallest_of_equal_ones() -> None:
    def site(best: int, low: float = 0.5, high: float = 0.75) -> dict[str, float]:
        return {candidate_key(c): (high if c >= best else low) for c in CANDIDATES}

    # below 16 both sites score 0.5, from 16 one gains, from 64 both: 64, the smallest of the best
    assert choose_min_voxels([site(16), site(64)]) == (64, 0.5, 0.75)
    flat = {candidate_key(c): 0.4 for c in CANDIDATES}
    assert choose_min_voxels([flat]) == (0, 0.4, 0.4)  # nothing gains: no change
    tampered = {**site(1), candidate_key(4): 7.0}  # not a Dice: that site does not vote
    partial = {candidate_key(c): 1.0 for c in CANDIDATES[:-1]}
    assert choose_min_voxels([tampered, partial, site(256)]) == (256, 0.5, 0.75)
    threshold, before, after = choose_min_voxels([tampered, {}])
    assert threshold == 0 and math.isnan(before) and math.isnan(after)


def test_an_ensemble_applies_the_smallest_threshold_of_its_members() -> None:
    members = [LabelScheme("brats", 4, True, 64), LabelScheme("brats", 4, True, 8)]
    assert smallest_threshold(members) == LabelScheme("brats", 4, True, 8)


def test_config_refuses_postprocessing_without_an_enhancing_tumour() -> None:
    with pytest.raises(ConfigError, match="'postprocess' 'enhancing-tumour' needs label-scheme 'brats'"):
        RunConfig.from_mapping({"postprocess": "enhancing-tumour"})
    with pytest.raises(ConfigError, match="'postprocess' is 'median'; choose one of: none, enhancing-tumour"):
        RunConfig.from_mapping({**BRATS_RUN, "postprocess": "median"})
    assert RunConfig.from_mapping({**BRATS_RUN, "postprocess": "enhancing-tumour"}).postprocess == "enhancing-tumour"
    with pytest.raises(ValueError, match="> 0 only with the 'brats' label scheme"):
        LabelScheme("classes", 3, enhancing_min_voxels=8)


def _checkpoint(threshold: int = 0) -> ModelCheckpoint:
    torch.manual_seed(0)
    network = build_model("unet", 4, 4)
    return ModelCheckpoint(
        network.state_dict(),
        "unet",
        4,
        (16, 16, 16),
        in_channels=4,
        label_scheme="brats",
        enhancing_min_voxels=threshold,
    )


@pytest.mark.parametrize("bad", [-1, True, "64", 2**40, 1.5])
def test_a_model_file_keeps_its_threshold_and_refuses_a_bad_one(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "model.pt"
    _checkpoint(48).save(path)
    assert ModelCheckpoint.load(path).labels.enhancing_min_voxels == 48
    data = torch.load(path, weights_only=True)
    assert data["format"] == "fedseg-model/3"  # a fedseg that cannot apply the threshold refuses the file
    data["enhancing_min_voxels"] = bad
    torch.save(data, path)
    with pytest.raises(CheckpointError, match=f"{path}: not a usable fedseg model file: 'enhancing_min_voxels'"):
        ModelCheckpoint.load(path)
    data.pop("enhancing_min_voxels")  # files written before the key: no post-processing
    torch.save(data, path)
    assert ModelCheckpoint.load(path).labels.enhancing_min_voxels == 0
    data.update(label_scheme="classes", num_classes=4, enhancing_min_voxels=8)
    torch.save(data, path)
    with pytest.raises(CheckpointError, match="> 0 only with the 'brats' label scheme"):
        ModelCheckpoint.load(path)


def test_predict_applies_the_models_threshold(tmp_path: Path) -> None:
    synthesize(tmp_path / "brain", "tiny", seed=0, num_sites=1, anatomy="brain")
    files = [Path(p) for p in load_datalist(tmp_path / "brain" / "site-0")[0]["image"]]
    maps = []
    for threshold in (0, 2**31 - 1):
        path = tmp_path / f"model-{threshold}.pt"
        _checkpoint(threshold).save(path)
        [out] = predict([path], files, tmp_path / f"seg-{threshold}.nii.gz")
        maps.append(np.asarray(nib.load(str(out)).dataobj))
    plain, processed = maps
    assert (plain == 4).any(), "the random model predicts some enhancing tumour"
    assert not (processed == 4).any()
    np.testing.assert_array_equal(processed, np.where(plain == 4, 1, plain))
    # an ensemble applies its smallest threshold, whatever the order of the models
    models = [tmp_path / "model-0.pt", tmp_path / f"model-{2**31 - 1}.pt"]
    for order, name in ((models, "ab"), (models[::-1], "ba")):
        [out] = predict(order, files, tmp_path / f"seg-{name}.nii.gz")
        np.testing.assert_array_equal(np.asarray(nib.load(str(out)).dataobj), plain)


def test_predict_counts_the_threshold_in_the_models_voxels() -> None:
    scheme = LabelScheme("brats", 4, True, 64)
    coarse = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    assert on_input_grid(scheme, (1.0, 1.0, 1.0), coarse).enhancing_min_voxels == 8  # 64 mm³ = 8 voxels of 8 mm³
    fine = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.diag([0.5, 0.5, 1.0, 1.0]))
    assert on_input_grid(scheme, (1.0, 1.0, 1.0), fine).enhancing_min_voxels == 256
    assert on_input_grid(scheme, None, coarse) == scheme  # a model without resampling works on the input grid


def test_a_federation_chooses_the_threshold_from_the_sites_replies_and_stores_it(
    tmp_path: Path, task_identity: None
) -> None:
    values = {
        **BRATS_RUN,
        "region-training": True,
        "postprocess": "enhancing-tumour",
        "num-server-rounds": 2,
        "output-dir": str(tmp_path / "runs"),
    }
    grid = InProcessGrid(values, 2)
    _, history = run_federation(grid, values, tmp_path / "run")
    evaluate_replies = [r for r in grid.replies if r.metadata.message_type == "evaluate"]
    assert evaluate_replies and not any(r.has_error() for r in evaluate_replies)
    for reply in evaluate_replies:
        metrics = reply.content.metric_records["metrics"]
        sent = [key for key in metrics if key.startswith("val-dice-ET-min-voxels-")]
        assert sorted(sent) == sorted(candidate_key(c) for c in CANDIDATES)
        assert all(ALLOWED_METRIC.match(key) for key in metrics), list(metrics)
        assert all(0.0 <= metrics[key] <= 1.0 for key in sent)
    final = ModelCheckpoint.load(tmp_path / "run" / "model.pt")
    assert final.labels.enhancing_min_voxels == choose_min_voxels(history.rounds[-1].eval.values())[0]
    best = ModelCheckpoint.load(tmp_path / "run" / "best-model.pt")
    best_round = history.rounds[history.best_round]
    assert best.labels.enhancing_min_voxels == choose_min_voxels(best_round.eval.values())[0]
    assert f"under {final.enhancing_min_voxels} voxels becomes core" in final.description
    resumable = ModelCheckpoint.load(tmp_path / "run" / "checkpoint.pt")  # the last round's weights and choice
    assert resumable.enhancing_min_voxels == choose_min_voxels(history.rounds[-1].eval.values())[0]


_VALUES = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70), st.booleans(), st.text(max_size=3)
)


@settings(max_examples=200, deadline=None)
@given(
    sites=st.lists(
        st.dictionaries(
            st.one_of(st.sampled_from([candidate_key(c) for c in CANDIDATES]), st.text(max_size=30)), _VALUES
        ),
        max_size=6,
    ),
    honest=st.lists(st.lists(st.floats(0.0, 1.0), min_size=len(CANDIDATES), max_size=len(CANDIDATES)), max_size=3),
)
def test_hostile_candidate_replies_never_break_the_choice(sites: list[dict], honest: list[list[float]]) -> None:
    """Whatever a site sends under the candidate keys, the server's choice is a candidate, and only the
    replies holding a Dice in [0, 1] for every candidate vote (what fedseg.federation passes on: floats)."""
    replies = [{k: float(v) for k, v in site.items() if isinstance(v, (int, float))} for site in sites]
    replies += [{candidate_key(c): v for c, v in zip(CANDIDATES, row, strict=True)} for row in honest]
    threshold, before, after = choose_min_voxels(replies)
    assert threshold in CANDIDATES
    voters = [r for r in replies if all(0.0 <= r.get(candidate_key(c), -1.0) <= 1.0 for c in CANDIDATES)]
    if not voters:
        assert threshold == 0 and math.isnan(before)
        return
    means = np.mean([[r[candidate_key(c)] for c in CANDIDATES] for r in voters], axis=0)
    assert after == pytest.approx(means.max()) and before == pytest.approx(means[0])
    assert threshold == CANDIDATES[int(np.argmax(means))]
