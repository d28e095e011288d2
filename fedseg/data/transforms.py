"""MONAI dictionary pipelines: a deterministic part (cacheable) and a random training part.

The deterministic part follows the prostate study: load (several modality files, or the channels
of a 4D NIfTI, become image channels), map stored label values to training ones where the label
scheme says so (BraTS enhancing tumour 4 → 3, fedseg.labels), reorient to RAS, resample to `pixdim`
mm (1 mm isotropic in the study; None keeps the stored grid), z-score the image on nonzero voxels
per channel.
Training adds, still deterministic, padding to at least one patch and the label's foreground and
background voxel indices, so the random crops of every epoch do not rescan the whole volume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapLabelValued,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
    Spacingd,
)

KEYS = ("image", "label")
STUDY_PIXDIM = (1.0, 1.0, 1.0)
FG_INDICES, BG_INDICES = "label_fg_indices", "label_bg_indices"  # FgBgToIndicesd's default output keys


def preprocessing(pixdim: Sequence[float] | None = None, label_mapping: Mapping[int, int] | None = None) -> Compose:
    """Load channel-first, map label values (`label_mapping`, stored → trained), RAS, optional
    resampling to `pixdim` mm, z-score on nonzero voxels."""
    steps = [LoadImaged(keys=KEYS, image_only=True, ensure_channel_first=True)]
    if label_mapping:
        stored, trained = zip(*sorted(label_mapping.items()))
        steps.append(MapLabelValued(keys="label", orig_labels=list(stored), target_labels=list(trained)))
    steps.append(Orientationd(keys=KEYS, axcodes="RAS", labels=None))
    if pixdim is not None:
        steps.append(Spacingd(keys=KEYS, pixdim=tuple(pixdim), mode=("bilinear", "nearest")))
    steps += [
        NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        EnsureTyped(keys=KEYS, track_meta=False),
    ]
    return Compose(steps)


def training_preprocessing(
    patch_size: Sequence[int], pixdim: Sequence[float] | None = None, label_mapping: Mapping[int, int] | None = None
) -> Compose:
    """`preprocessing`, padding to at least `patch_size`, then the label's foreground/background voxel indices."""
    return Compose(
        [
            *preprocessing(pixdim, label_mapping).transforms,
            SpatialPadd(keys=KEYS, spatial_size=tuple(patch_size)),
            FgBgToIndicesd(keys="label"),
            # plain tensors as `preprocessing` gives; int32 indices take half the memory of int64
            EnsureTyped(
                keys=(*KEYS, FG_INDICES, BG_INDICES), dtype=(None, None, torch.int32, torch.int32), track_meta=False
            ),
        ]
    )


def augmentation(
    patch_size: Sequence[int], samples_per_volume: int = 2, max_rotation_deg: float = 10.0, max_scale: float = 0.1
) -> Compose:
    """Positive/negative patch crops (from `training_preprocessing`'s indices), flips, small rotations
    and scalings, intensity jitter."""
    angle = math.radians(max_rotation_deg)
    return Compose(
        [
            RandCropByPosNegLabeld(
                keys=KEYS,
                label_key="label",
                spatial_size=tuple(patch_size),
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
                scale_range=(max_scale, max_scale, max_scale),
                mode=("bilinear", "nearest"),
                padding_mode="border",
            ),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )
