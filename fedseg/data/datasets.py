"""MONAI datasets for a site: deterministic preprocessing cached once, augmentation per epoch."""

from __future__ import annotations

from collections.abc import Sequence

from monai.data import CacheDataset
from monai.transforms import Compose

from fedseg.data.datalist import Datalist
from fedseg.data.transforms import augmentation, preprocessing


def training_dataset(items: Datalist, patch_size: Sequence[int], pixdim: Sequence[float] | None = None) -> CacheDataset:
    """Cached preprocessing followed by random patch sampling and augmentation."""
    pipeline = Compose(list(preprocessing(pixdim).transforms) + list(augmentation(patch_size).transforms))
    return CacheDataset(items, transform=pipeline, num_workers=0, progress=False)


def evaluation_dataset(items: Datalist, pixdim: Sequence[float] | None = None) -> CacheDataset:
    """Whole preprocessed volumes for sliding-window evaluation."""
    return CacheDataset(items, transform=preprocessing(pixdim), num_workers=0, progress=False)
