"""A site's datalist (MSD `dataset.json`) and its seeded train / validation / test split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist

Datalist = list[dict[str, str]]


class SiteDataError(ValueError):
    """A site's data folder cannot be used; the message names the file and the fault."""


@dataclass(frozen=True)
class SiteSplit:
    """Subjects of one site, split for training, validation during training, and testing."""

    train: Datalist
    val: Datalist
    test: Datalist


def load_datalist(site_dir: str | Path) -> Datalist:
    """Read the labelled subjects of an MSD-style site folder (`dataset.json`)."""
    manifest = Path(site_dir) / "dataset.json"
    if not manifest.is_file():
        raise SiteDataError(f"{manifest}: not found (a site folder needs an MSD-style dataset.json)")
    try:
        items = load_decathlon_datalist(str(manifest), is_segmentation=True, data_list_key="training")
    except (ValueError, KeyError) as err:
        raise SiteDataError(f"{manifest}: {err}") from err
    if not items:
        raise SiteDataError(f"{manifest}: the 'training' list is empty")
    return items


def split_datalist(items: Datalist, seed: int, test_fraction: float = 0.2, val_fraction: float = 0.2) -> SiteSplit:
    """Seeded split: test first (as in the prostate study's 80/20), validation carved from train."""
    if len(items) < 3:
        raise SiteDataError(f"need at least 3 subjects to split into train/val/test, got {len(items)}")
    order = np.random.default_rng(seed).permutation(len(items))
    n_test = max(1, round(len(items) * test_fraction))
    n_val = max(1, round((len(items) - n_test) * val_fraction))
    test = [items[i] for i in order[:n_test]]
    val = [items[i] for i in order[n_test : n_test + n_val]]
    train = [items[i] for i in order[n_test + n_val :]]
    return SiteSplit(train=train, val=val, test=test)
