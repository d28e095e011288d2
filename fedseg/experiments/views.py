"""Data views: site folders made of links to real subjects, with a fixed split file.

A view is what the centralized arm (all sites pooled) and the k-fold submodels train on. It is
a plain `images/` + `labels/` site folder of symbolic links (subject ids prefixed with the site,
so pooled ids stay unique) plus `splits/split-seed<seed>.json`, which `load_site_split` reuses —
so the ClientApp reads a view exactly as it reads a real site. Views live in the results folder
and hold the file `allow-outside-data` (their links leave the folder by design; see fedseg.data.datalist).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseg.data.datalist import ALLOW_OUTSIDE_FILE, SiteSplit
from fedseg.data.sites import SPLITS_FOLDER, load_site_split
from fedseg.data.splits import kfold_ids


@dataclass(frozen=True)
class SitePart:
    """Items of one site that a view takes, by role."""

    site: int
    train: list[dict]
    val: list[dict]
    test: list[dict]


def site_parts(site: int, split: SiteSplit, fold: int | None, folds: int, seed: int) -> SitePart:
    """The site's own split, or fold `fold` of its train+val subjects (held-out fold = validation)."""
    if fold is None:
        return SitePart(site, split.train, split.val, split.test)
    pool = split.train + split.val
    by_id = {item["subject"]: item for item in pool}
    train_ids, held_out = kfold_ids(list(by_id), folds, seed)[fold]
    return SitePart(site, [by_id[i] for i in train_ids], [by_id[i] for i in held_out], split.test)


def load_splits(site_dirs: Sequence[Path], seed: int) -> list[SiteSplit]:
    """Each site's split, as the ClientApp makes (and saves) it."""
    return [load_site_split(site_dir, seed) for site_dir in site_dirs]


def write_view(folder: Path, parts: Sequence[SitePart], seed: int) -> Path:
    """(Re)write a view folder of `parts`; return it."""
    if folder.exists():
        shutil.rmtree(folder)
    for sub in ("images", "labels", SPLITS_FOLDER):
        (folder / sub).mkdir(parents=True)
    roles: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for part in parts:
        for role in roles:
            for item in getattr(part, role):
                roles[role].append(_link_subject(folder, f"site{part.site}-{item['subject']}", item))
    (folder / SPLITS_FOLDER / f"split-seed{seed}.json").write_text(json.dumps(roles, indent=2))
    (folder / ALLOW_OUTSIDE_FILE).write_text("fedseg data view: its links point to the real sites' files\n")
    return folder


def _link_subject(folder: Path, subject: str, item: dict) -> str:
    images = [item["image"]] if isinstance(item["image"], str) else list(item["image"])
    for channel, image in enumerate(images):  # always `<id>_0000`: the id is then exactly `subject`
        os.symlink(Path(image).resolve(), folder / "images" / f"{subject}_{channel:04d}{_suffix(image)}")
    os.symlink(Path(item["label"]).resolve(), folder / "labels" / f"{subject}{_suffix(item['label'])}")
    return subject


def _suffix(path: str) -> str:
    return ".nii.gz" if path.endswith(".nii.gz") else ".nii"
