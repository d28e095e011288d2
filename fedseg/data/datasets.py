"""MONAI datasets for a site: deterministic preprocessing cached once, augmentation per epoch.

With `cache_dir` the preprocessed volumes persist on disk (MONAI PersistentDataset), so later
rounds and later runs skip loading and resampling; without it they are cached in memory. Disk
entries are keyed by the item's files (path, size, mtime) under a folder keyed by the pipeline,
so an edited scan or a different `pixdim` never reuses a stale entry.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing
from monai.transforms import Compose

from fedseg.data.datalist import Datalist
from fedseg.data.transforms import augmentation, preprocessing


def training_dataset(
    items: Datalist,
    patch_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    samples_per_volume: int = 2,
) -> Dataset:
    """Cached preprocessing followed by random patch sampling and augmentation."""
    return _cached(items, pixdim, augmentation(patch_size, samples_per_volume), cache_dir)


def evaluation_dataset(
    items: Datalist, pixdim: Sequence[float] | None = None, cache_dir: str | Path | None = None
) -> Dataset:
    """Whole preprocessed volumes for sliding-window evaluation."""
    return _cached(items, pixdim, None, cache_dir)


def _cached(
    items: Datalist, pixdim: Sequence[float] | None, random: Compose | None, cache_dir: str | Path | None
) -> Dataset:
    deterministic = preprocessing(pixdim)
    steps = list(deterministic.transforms) + (list(random.transforms) if random is not None else [])
    pipeline = Compose(steps)
    if cache_dir is None:
        return CacheDataset(items, transform=pipeline, num_workers=0, progress=False)
    folder = Path(cache_dir) / f"pre-{_pipeline_key(deterministic, pixdim)}"
    return PersistentDataset(items, transform=pipeline, cache_dir=folder, hash_func=_item_key)


def _pipeline_key(deterministic: Compose, pixdim: Sequence[float] | None) -> str:
    """Short hash of the deterministic steps and the resampling grid."""
    described = {"steps": [type(step).__name__ for step in deterministic.transforms], "pixdim": pixdim}
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def _item_key(item: dict) -> bytes:
    """Hash of an item's file paths, sizes and modification times."""
    files = []
    for key in ("image", "label"):
        paths = item.get(key)
        for path in [paths] if isinstance(paths, str) else paths or []:
            stat = Path(path).stat()
            files.append([str(path), stat.st_size, stat.st_mtime_ns])
    return json_hashing(files)
