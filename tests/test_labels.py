"""Label schemes: region Dice by hand, the BraTS rule for empty regions, region training targets."""

from __future__ import annotations

import math

import pytest
import torch

from fedseg.labels import LabelScheme


def _volume(values: list[int]) -> torch.Tensor:
    """A (1, 1, n, 1, 1) label map."""
    return torch.tensor(values).view(1, 1, -1, 1, 1)


def _certain(label: torch.Tensor, classes: int) -> torch.Tensor:
    """Softmax-like probabilities that put all mass on `label`."""
    return torch.nn.functional.one_hot(label[:, 0], classes).movedim(-1, 1).float()


def _dice(a: set[int], b: set[int]) -> float:
    return 2 * len(a & b) / (len(a) + len(b))


def test_region_dice_matches_a_hand_computation() -> None:
    truth = _volume([0, 1, 2, 2, 4, 4, 0, 1])
    prediction = _volume([0, 1, 2, 0, 3, 2, 2, 3])  # model output in training values (enhancing = 3)
    brats = LabelScheme("brats", 4)
    dice = brats.dice(_certain(prediction, 4), truth)[0].tolist()
    # voxel indices of each region: WT = 1 ∪ 2 ∪ 4, TC = 1 ∪ 4, ET = 4 (3 in the prediction)
    wt_t, wt_p = {1, 2, 3, 4, 5, 7}, {1, 2, 4, 5, 6, 7}
    tc_t, tc_p = {1, 4, 5, 7}, {1, 4, 7}
    et_t, et_p = {4, 5}, {4, 7}
    assert dice == pytest.approx([_dice(wt_t, wt_p), _dice(tc_t, tc_p), _dice(et_t, et_p)])
    assert brats.structures == ("WT", "TC", "ET")
    assert brats.metric_names == ("dice-WT", "dice-TC", "dice-ET")


def test_empty_regions_follow_the_brats_rule() -> None:
    brats = LabelScheme("brats", 4)
    low_grade = _volume([0, 1, 2, 2, 0])  # no enhancing tumour in the truth
    right = brats.dice(_certain(_volume([0, 1, 2, 2, 0]), 4), low_grade)[0].tolist()
    assert right[2] == 1.0  # ET absent from truth and prediction: 1
    wrong = brats.dice(_certain(_volume([0, 1, 2, 3, 0]), 4), low_grade)[0].tolist()
    assert wrong[2] == 0.0  # ET predicted where there is none: 0
    # the classes scheme leaves a class absent from the truth out (NaN), as before
    classes = LabelScheme("classes", 3).dice(_certain(_volume([0, 1, 2, 0]), 3), _volume([0, 1, 1, 0]))[0].tolist()
    assert classes[0] == pytest.approx(_dice({1, 2}, {1})) and math.isnan(classes[1])


def test_region_training_targets_and_decoding_are_nested() -> None:
    regions = LabelScheme("brats", 4, region_training=True)
    label = _volume([0, 1, 2, 3, 4])
    target = regions.loss_target(label)
    assert target.shape == (1, 3, 5, 1, 1)
    assert target[0, :, :, 0, 0].tolist() == [[0, 1, 1, 1, 1], [0, 1, 0, 1, 1], [0, 0, 0, 1, 1]]
    # sigmoid outputs: nested decoding (ET inside TC inside WT) gives training values; stored 4 reads as 3
    assert regions.label_map(target).view(-1).tolist() == [0, 1, 2, 3, 3]
    assert regions.out_channels == 3 and LabelScheme("brats", 4).out_channels == 4
    loss = regions.loss()(torch.full((1, 3, 5, 1, 1), 8.0) * (2 * target - 1), target)
    assert float(loss) < 0.01  # confident, correct sigmoid logits: near-zero Dice + BCE


def test_schemes_refuse_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="'brats' has 4 classes"):
        LabelScheme("brats", 5)
    with pytest.raises(ValueError, match="region training needs the 'brats'"):
        LabelScheme("classes", 3, region_training=True)
    with pytest.raises(ValueError, match="unknown"):
        LabelScheme("regions", 3)
