"""MONAI datasets for a site: deterministic preprocessing cached once, augmentation per epoch.

With `cache_dir` the preprocessed volumes persist on disk (MONAI PersistentDataset), so later
rounds and later runs skip loading and resampling; without it they are cached in memory. Disk
entries are keyed by the item's files (path, size, mtime) under a folder keyed by the pipeline
(its steps, `pixdim` and, for training, the patch size it pads to), so an edited scan or another
grid or patch size never reuses a stale entry. Opening a dataset marks its folder as used;
`prune_unused` removes pipeline folders no dataset has opened for a while.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing
from monai.transforms import Compose

from fedseg.data.datalist import Datalist, file_stamps
from fedseg.data.nifti_guard import guard_datalist
from fedseg.data.transforms import augmentation as random_part
from fedseg.data.transforms import preprocessing, training_preprocessing
from fedseg.intensity import IntensityWindow

PIPELINE_PREFIX = "pre-"
UNUSED_DAYS = 30.0  # pipeline folders not used for this long are pruned when a site starts work


def training_dataset(
    items: Datalist,
    patch_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    samples_per_volume: int = 2,
    label_mapping: Mapping[int, int] | None = None,
    augmentation: str = "standard",
    invert_probability: float = 0.0,
    remap_probability: float = 0.0,
    structure_probability: float = 0.0,
    window: IntensityWindow | None = None,
) -> Dataset:
    """Cached preprocessing (with crop indices) followed by random patch sampling and augmentation
    preset `augmentation` (fedseg.data.transforms.AUGMENTATIONS; `invert_probability`,
    `remap_probability` and `structure_probability`: "shift"'s contrast inversion, random tissue
    contrast and random structure contrast). The preset is not
    part of the cache key: it only acts after the cache."""
    deterministic = training_preprocessing(patch_size, pixdim, label_mapping, window)
    settings = {
        "pixdim": pixdim,
        "patch_size": list(patch_size),
        **_mapping_setting(label_mapping),
        **_window_setting(window),
    }
    random = random_part(
        patch_size,
        samples_per_volume,
        preset=augmentation,
        invert_probability=invert_probability,
        remap_probability=remap_probability,
        structure_probability=structure_probability,
    )
    return _cached(items, deterministic, settings, random, cache_dir)


def evaluation_dataset(
    items: Datalist,
    pixdim: Sequence[float] | None = None,
    cache_dir: str | Path | None = None,
    label_mapping: Mapping[int, int] | None = None,
    window: IntensityWindow | None = None,
) -> Dataset:
    """Whole preprocessed volumes for sliding-window evaluation (`window`: fedseg.intensity; None: z-score)."""
    settings = {"pixdim": pixdim, **_mapping_setting(label_mapping), **_window_setting(window)}
    return _cached(items, preprocessing(pixdim, label_mapping, window), settings, None, cache_dir)


def _mapping_setting(label_mapping: Mapping[int, int] | None) -> dict:
    """The label mapping as a cache-key setting (none: no key, so existing cache folders stay valid)."""
    return {"label_mapping": sorted(label_mapping.items())} if label_mapping else {}


def _window_setting(window: IntensityWindow | None) -> dict:
    """The intensity window as a cache-key setting (z-score: no key, so existing cache folders stay valid)."""
    return {"intensity": window.to_list()} if window is not None else {}


def _cached(
    items: Datalist, deterministic: Compose, settings: dict, random: Compose | None, cache_dir: str | Path | None
) -> Dataset:
    """`deterministic` cached (memory, or disk under a folder keyed by its steps and `settings`), then `random`.
    Every file's header is checked first (fedseg.data.nifti_guard: no header bomb reaches LoadImaged)."""
    guard_datalist(items, settings.get("pixdim"))
    steps = list(deterministic.transforms) + (list(random.transforms) if random is not None else [])
    pipeline = Compose(steps)
    if cache_dir is None:
        return CacheDataset(items, transform=pipeline, num_workers=0, progress=False)
    folder = Path(cache_dir) / f"{PIPELINE_PREFIX}{_pipeline_key(deterministic, settings)}"
    folder.mkdir(parents=True, exist_ok=True)
    os.utime(folder)  # marks the folder as used (see prune_unused)
    return PersistentDataset(items, transform=pipeline, cache_dir=folder, hash_func=_item_key)


def prune_unused(cache_dir: str | Path, max_age_days: float = UNUSED_DAYS) -> list[str]:
    """Remove the pipeline folders under `cache_dir` that no dataset opened or wrote for
    `max_age_days` (those of other grids or patch sizes); returns their names."""
    cutoff = time.time() - max_age_days * 86400
    removed = []
    for folder in sorted(Path(cache_dir).glob(f"{PIPELINE_PREFIX}*")):
        if folder.is_dir() and folder.stat().st_mtime < cutoff:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder.name)
    return removed


def _pipeline_key(deterministic: Compose, settings: dict) -> str:
    """Short hash of the deterministic steps and their settings (resampling grid, padded patch size)."""
    described = {"steps": [type(step).__name__ for step in deterministic.transforms], **settings}
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def _item_key(item: dict) -> bytes:
    """Hash of an item's file paths, sizes and modification times."""
    paths: list[str] = []
    for key in ("image", "label"):
        value = item.get(key)
        paths += [value] if isinstance(value, str) else list(value or [])
    return json_hashing(file_stamps(paths))
