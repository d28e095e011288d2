"""Training augmentation presets: patch shapes, label values, the unchanged "standard" pipeline, what
"shift" does to intensities, contrast inversion, determinism, config keys and the disk cache key."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import (
    Compose,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
)

from fedseg.config import ConfigError, RunConfig
from fedseg.data.datalist import load_datalist
from fedseg.data.datasets import training_dataset
from fedseg.data.transforms import (
    AUGMENTATIONS,
    BG_INDICES,
    FG_INDICES,
    KEYS,
    RandNegated,
    RandStructureContrastd,
    RandTissueContrastd,
    augmentation,
    preprocessing,
    training_preprocessing,
)

PATCH = (16, 16, 16)
SIDE = 24
LABEL_VALUES = {0.0, 1.0, 2.0}


def preprocessed(channels: int = 1, seed: int = 0) -> dict:
    """A z-scored `channels`-channel volume with a two-class blob, after `training_preprocessing`'s
    steps that follow loading (padding, crop indices, plain tensors)."""
    rng = np.random.default_rng(seed)
    label = np.zeros((1, SIDE, SIDE, SIDE), np.float32)
    label[0, 5:15, 6:18, 8:20] = 1
    label[0, 8:12, 9:14, 11:17] = 2
    image = np.stack([label[0] * (1 + 0.5 * c) + 0.3 * rng.standard_normal(label.shape[1:]) for c in range(channels)])
    image = (image - image.mean(axis=(1, 2, 3), keepdims=True)) / image.std(axis=(1, 2, 3), keepdims=True)
    after_loading = training_preprocessing(PATCH).transforms[len(preprocessing().transforms) :]
    return Compose(after_loading)(
        {"image": torch.as_tensor(image, dtype=torch.float32), "label": torch.as_tensor(label)}
    )


def patches(
    preset: str,
    item: dict,
    seed: int,
    samples: int = 2,
    invert: float = 0.0,
    remap: float = 0.0,
    structures: float = 0.0,
) -> list[dict]:
    pipeline = augmentation(
        PATCH,
        samples,
        preset=preset,
        invert_probability=invert,
        remap_probability=remap,
        structure_probability=structures,
    )
    pipeline.set_random_state(seed=seed)
    return pipeline(item)


def old_standard(patch_size: tuple[int, ...], samples_per_volume: int) -> Compose:
    """The random training part as it was before the presets (copied from fedseg.data.transforms)."""
    angle = math.radians(10.0)
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys=KEYS,
                label_key="label",
                spatial_size=patch_size,
                pos=1,
                neg=1,
                num_samples=samples_per_volume,
                fg_indices_key=FG_INDICES,
                bg_indices_key=BG_INDICES,
            ),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
            RandAffined(
                keys=KEYS,
                prob=0.3,
                rotate_range=(angle, angle, angle),
                scale_range=(0.1, 0.1, 0.1),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )


def wasserstein(a: torch.Tensor, b: torch.Tensor) -> float:
    """Distance between the value distributions of two patches (insensitive to flips and rotations)."""
    return float((a.flatten().sort().values - b.flatten().sort().values).abs().mean())


@pytest.mark.parametrize("channels", [1, 4])
@pytest.mark.parametrize("preset", AUGMENTATIONS)
def test_every_preset_gives_patches_with_the_label_values_kept(preset: str, channels: int) -> None:
    item = preprocessed(channels)
    for seed in range(4):  # "shift" rotates/scales 40 % of patches: some of these 12 are resampled
        shift = preset == "shift"
        out = patches(preset, item, seed, samples=3, invert=0.5 * shift, structures=0.5 * shift)
        assert len(out) == 3
        for patch in out:
            assert tuple(patch["image"].shape) == (channels, *PATCH) and tuple(patch["label"].shape) == (1, *PATCH)
            assert patch["image"].dtype == torch.float32 and bool(torch.isfinite(patch["image"]).all())
            assert set(torch.unique(patch["label"]).tolist()) <= LABEL_VALUES  # nearest: no in-between values


@pytest.mark.parametrize("channels", [1, 4])
def test_standard_is_the_old_pipeline_bit_for_bit(channels: int) -> None:
    item = preprocessed(channels)
    for seed in (0, 7):
        old = old_standard(PATCH, 2).set_random_state(seed=seed)(item)
        for new in (patches("standard", item, seed), augmentation(PATCH, 2).set_random_state(seed=seed)(item)):
            for before, after in zip(old, new, strict=True):
                assert torch.equal(before["image"], after["image"]) and torch.equal(before["label"], after["label"])


def test_none_only_crops() -> None:
    item = preprocessed()
    for patch in patches("none", item, seed=3, samples=4):
        corner = [int(torch.nonzero(item["image"][0] == patch["image"][0, 0, 0, 0])[0][axis]) for axis in range(3)]
        window = tuple(slice(c, c + p) for c, p in zip(corner, PATCH, strict=True))
        assert torch.equal(patch["image"], item["image"][(slice(None), *window)])
        assert torch.equal(patch["label"], item["label"][(slice(None), *window)])


def test_shift_changes_intensity_statistics_much_more_than_standard() -> None:
    item = preprocessed()
    plain = patches("none", item, seed=1, samples=32)  # same seed: the same crops
    distance = {
        preset: np.mean(
            [
                wasserstein(a["image"], b["image"])
                for a, b in zip(patches(preset, item, seed=1, samples=32), plain, strict=True)
            ]
        )
        for preset in ("standard", "shift")
    }
    assert distance["standard"] < 0.15  # ±10 % scale and ±0.1 shift, resampling
    assert distance["shift"] > 0.2 and distance["shift"] > 2 * distance["standard"]


def test_shift_draws_each_channel_on_its_own() -> None:
    one = preprocessed(1)
    item = {**one, "image": one["image"].repeat(4, 1, 1, 1)}  # four identical channels
    for patch in patches("standard", item, seed=2, samples=4):
        assert all(torch.equal(patch["image"][0], patch["image"][c]) for c in range(1, 4))
    differing = [
        not torch.allclose(p["image"][0], p["image"][c])
        for p in patches("shift", item, seed=2, samples=4)
        for c in range(1, 4)
    ]
    assert sum(differing) >= 6


@pytest.mark.parametrize("channels", [1, 4])
def test_inversion_negates_the_same_draw(channels: int) -> None:
    item = preprocessed(channels)
    assert not any(isinstance(step, RandNegated) for step in augmentation(PATCH, preset="shift").transforms)
    kept, inverted = patches("shift", item, seed=5, samples=4), patches("shift", item, seed=5, samples=4, invert=1.0)
    for a, b in zip(kept, inverted, strict=True):
        assert torch.equal(b["image"], -a["image"]) and torch.equal(a["label"], b["label"])
        correlation = np.corrcoef(a["image"].flatten().numpy(), b["image"].flatten().numpy())[0, 1]
        assert correlation == pytest.approx(-1.0)
    some = patches("shift", item, seed=5, samples=40, invert=0.3)
    flipped = sum(
        torch.equal(b["image"], -a["image"]) for a, b in zip(patches("shift", item, 5, 40), some, strict=True)
    )
    assert 4 <= flipped <= 24  # about 12 of 40


def test_tissue_contrast_remap_gives_random_structure_contrasts_on_the_same_shapes() -> None:
    item = preprocessed(1)
    assert not any(isinstance(step, RandTissueContrastd) for step in augmentation(PATCH, preset="shift").transforms)
    plain, remapped = patches("shift", item, seed=3, samples=60), patches("shift", item, seed=3, samples=60, remap=1.0)
    brighter, weak = 0, 0
    for a, b in zip(plain, remapped, strict=True):
        assert torch.equal(a["label"], b["label"]) and not torch.equal(a["image"], b["image"])
        assert float(b["image"].mean()) == pytest.approx(0.0, abs=1e-4)
        assert float(b["image"].std()) == pytest.approx(1.0, abs=1e-2)
        label, image = b["label"][0], b["image"][0]
        if (label == 1).any() and (label == 2).any():
            brighter += float(image[label == 2].mean()) > float(image[label == 1].mean())
        rank = np.corrcoef(a["image"].flatten().argsort().argsort(), b["image"].flatten().argsort().argsort())[0, 1]
        weak += abs(rank) < 0.8  # a non-monotone curve: neither the old contrast nor its inversion
    assert 10 <= brighter <= 50  # in the input, class 2 is always the brighter one
    assert weak >= 10


def test_structure_contrast_repaints_labelled_structures_and_keeps_their_surroundings() -> None:
    label = torch.zeros(1, SIDE, SIDE, SIDE)
    label[0, 4:20, 4:20, 4:20] = 1
    label[0, 8:16, 8:16, 8:16] = 2  # inside structure 1, always the brighter one in the input
    rng = np.random.default_rng(0)
    image = (label * 1.5 + 0.2 * torch.as_tensor(rng.standard_normal(label.shape), dtype=torch.float32)).float()
    item = {"image": image, "label": label}
    assert RandStructureContrastd("image", label_key="label", prob=0.0)(item)["image"] is image
    repaint = RandStructureContrastd("image", label_key="label", prob=1.0)
    repaint.set_random_state(seed=5)
    far = torch.ones(SIDE, SIDE, SIDE, dtype=torch.bool)
    far[2:22, 2:22, 2:22] = False  # background three voxels or more from structure 1 (beyond the kernel)
    brighter, below_background = 0, 0
    for _ in range(100):
        out = repaint(item)
        assert torch.equal(out["label"], label)
        torch.testing.assert_close(out["image"][0][far], image[0][far], atol=1e-5, rtol=0)
        means = [float(out["image"][0][label[0] == v].mean()) for v in (0, 1, 2)]
        brighter += means[2] > means[1]
        below_background += means[1] < means[0]
    assert 25 <= brighter <= 75  # in the input: always
    assert below_background >= 5  # in the input: never (levels are uniform over the patch's 2–98 % range)
    empty = {"image": image, "label": torch.zeros_like(label)}
    assert torch.equal(repaint(empty)["image"], image)
    # a structure filling the patch: every voxel, border ones included, moves by the same level shift
    whole = {"image": image, "label": torch.ones_like(label)}
    shifted = repaint(whole)["image"][0]
    gained = shifted - shifted.mean()
    texture = (image[0] - image[0].mean()) / (image[0] - image[0].mean()).std()
    torch.testing.assert_close(gained / gained.std(), texture, atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", AUGMENTATIONS)
def test_same_seed_same_patches(preset: str) -> None:
    item = preprocessed(4)
    invert = structures = 0.5 if preset == "shift" else 0.0
    first, again = (patches(preset, item, seed=11, samples=3, invert=invert, structures=structures) for _ in range(2))
    other = patches(preset, item, seed=12, samples=3, invert=invert, structures=structures)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    assert not all(torch.equal(a["image"], c["image"]) for a, c in zip(first, other, strict=True))


def test_training_dataset_presets_share_the_disk_cache(tmp_path: Path) -> None:
    site = tmp_path / "site"
    item = preprocessed()
    for name in ("a", "b"):
        (site / "images").mkdir(parents=True, exist_ok=True)
        (site / "labels").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(item["image"][0].numpy() + 3.0, np.eye(4)), site / "images" / f"{name}.nii.gz")
        nib.save(
            nib.Nifti1Image(item["label"][0].numpy().astype(np.uint8), np.eye(4)), site / "labels" / f"{name}.nii.gz"
        )
    cache = tmp_path / "cache"
    first = {}
    for preset, invert in (("standard", 0.0), ("shift", 0.3), ("none", 0.0)):
        dataset = training_dataset(
            load_datalist(site), PATCH, cache_dir=cache, augmentation=preset, invert_probability=invert
        )
        dataset.transform.set_random_state(seed=0)
        first[preset] = dataset[0]
        assert tuple(first[preset][0]["image"].shape) == (1, *PATCH)
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 1  # one pipeline folder: the key ignores the preset
    assert len(list(cache.rglob("*.pt"))) == 1  # the subject preprocessed once, reused by all three
    assert not torch.equal(first["standard"][0]["image"], first["shift"][0]["image"])


def test_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="standard, shift, none"):
        augmentation(PATCH, preset="heavy")


def test_config_keys() -> None:
    default = RunConfig.from_mapping({})
    assert (default.augmentation, default.augmentation_invert) == ("standard", 0.0)
    chosen = RunConfig.from_mapping({"augmentation": "shift", "augmentation-invert": 0.3})
    assert (chosen.augmentation, chosen.augmentation_invert) == ("shift", 0.3)
    assert chosen.to_dict()["augmentation-invert"] == 0.3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"augmentation": "heavy"}, "'augmentation' is 'heavy'; choose one of: standard, shift, none"),
        ({"augmentation": 1}, "'augmentation' must be a string"),
        ({"augmentation": "shift", "augmentation-invert": 1.5}, "'augmentation-invert' must be in [0, 1], got 1.5"),
        ({"augmentation": "shift", "augmentation-invert": -0.1}, "'augmentation-invert' must be in [0, 1]"),
        ({"augmentation-invert": "often"}, "'augmentation-invert' must be a number"),
        ({"augmentation-invert": 0.3}, "'augmentation-invert' is 0.3 but only augmentation 'shift' inverts"),
        ({"augmentation": "shift", "augmentation-remap": 2}, "'augmentation-remap' must be in [0, 1], got 2"),
        ({"augmentation-remap": 0.5}, "'augmentation-remap' is 0.5 but only augmentation 'shift' remaps"),
        ({"augmentation": "shift", "augmentation-structures": -1}, "'augmentation-structures' must be in [0, 1]"),
        ({"augmentation-structures": 0.5}, "'augmentation-structures' is 0.5 but only augmentation 'shift' repaints"),
    ],
)
def test_config_errors_name_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping(values)
    assert message in str(error.value)
