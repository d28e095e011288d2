"""MONAI dictionary pipelines: a deterministic part (cacheable) and a random training part."""

from __future__ import annotations

from collections.abc import Sequence

from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    Spacingd,
)

KEYS = ("image", "label")


def preprocessing(pixdim: Sequence[float] | None = None) -> Compose:
    """Load, channel-first, RAS, optional resampling, z-score on nonzero voxels."""
    steps = [
        LoadImaged(keys=KEYS, image_only=True),
        EnsureChannelFirstd(keys=KEYS),
        Orientationd(keys=KEYS, axcodes="RAS"),
    ]
    if pixdim is not None:
        steps.append(Spacingd(keys=KEYS, pixdim=tuple(pixdim), mode=("bilinear", "nearest")))
    steps += [
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        EnsureTyped(keys=KEYS, track_meta=False),
    ]
    return Compose(steps)


def augmentation(patch_size: Sequence[int], samples_per_volume: int = 2) -> Compose:
    """Positive/negative patch crops, flips and intensity jitter (training only)."""
    return Compose(
        [
            SpatialPadd(keys=KEYS, spatial_size=tuple(patch_size)),
            RandCropByPosNegLabeld(
                keys=KEYS,
                label_key="label",
                spatial_size=tuple(patch_size),
                pos=1,
                neg=1,
                num_samples=samples_per_volume,
            ),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
            RandFlipd(keys=KEYS, prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )
