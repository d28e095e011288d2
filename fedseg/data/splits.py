"""Seeded per-site splits (train / validation / test, k folds), saved as JSON for reproducibility.

A split names subject ids only. `load_or_make_split` writes `<split_dir>/split-seed<seed>.json`
the first time and reuses it afterwards, so a later run (or a resumed one) sees the same subjects
even if the splitting code changes; a file that disagrees with the site's subjects, leaves a part
empty or names an id in two parts is an error.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
from monai.data import partition_dataset

from fedseg.atomic import atomic_write_text
from fedseg.data.datalist import Datalist, SiteDataError, SiteSplit
from fedseg.json_records import fault_without_path, read_json_object

DEFAULT_TEST_FRACTION = 0.2  # the prostate study's 80/20 train/test
DEFAULT_VAL_FRACTION = 0.2  # carved from the training part
MIN_SUBJECTS = 3  # one each for train, validation and test


@dataclass(frozen=True)
class SplitIds:
    """Subject ids of each part of a site's split."""

    train: list[str]
    val: list[str]
    test: list[str]


def split_ids(
    ids: list[str], seed: int, test_fraction: float = DEFAULT_TEST_FRACTION, val_fraction: float = DEFAULT_VAL_FRACTION
) -> SplitIds:
    """Seeded split: test first, then validation carved from what is left; every part non-empty."""
    if len(ids) < MIN_SUBJECTS:
        message = f"need at least {MIN_SUBJECTS} subjects to split into train/val/test, got {len(ids)}"
        raise SiteDataError(message, f"site data invalid: {message}")
    order = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
    n_test = min(len(ids) - 2, max(1, round(len(ids) * test_fraction)))
    n_val = min(len(ids) - n_test - 1, max(1, round((len(ids) - n_test) * val_fraction)))
    return SplitIds(train=order[n_test + n_val :], val=order[n_test : n_test + n_val], test=order[:n_test])


def kfold_ids(ids: list[str], folds: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """(train, held-out) id lists of `folds` seeded folds, e.g. for an ensemble of fold models."""
    if not 2 <= folds <= len(ids):
        raise SiteDataError(f"k-fold needs 2 <= folds <= subjects ({len(ids)}), got {folds}")
    parts = partition_dataset(list(ids), num_partitions=folds, shuffle=True, seed=seed, even_divisible=False)
    return [([i for j, part in enumerate(parts) if j != k for i in part], list(parts[k])) for k in range(folds)]


def apply_split(items: Datalist, ids: SplitIds) -> SiteSplit:
    """Datalist items of each part, in the order the split names them."""
    by_id = {item["subject"]: item for item in items}
    return SiteSplit(*([by_id[sid] for sid in part] for part in (ids.train, ids.val, ids.test)))


def load_or_make_split(items: Datalist, seed: int, split_dir: Path) -> SiteSplit:
    """Reuse `<split_dir>/split-seed<seed>.json` or make and save it (silently unsaved if read-only)."""
    path = split_dir / f"split-seed{seed}.json"
    ids = sorted(item["subject"] for item in items)
    if path.is_file():
        saved = _read_split(path)
        named = sorted(saved.train + saved.val + saved.test)
        if named != ids:
            unknown = sorted(set(named) - set(ids))
            unsplit = sorted(set(ids) - set(named))
            raise SiteDataError(
                f"{path}: split file does not match the site's subjects"
                f" (unknown: {unknown[:5]}, not in split: {unsplit[:5]}); delete it to split again",
                "the site's saved split file does not match its subjects",
            )
        return apply_split(items, saved)
    split = split_ids(ids, seed)
    with contextlib.suppress(OSError):  # a read-only site folder: the seeded split is still reproducible from the seed
        atomic_write_text(path, json.dumps(asdict(split), indent=2))
    return apply_split(items, split)


def _read_split(path: Path) -> SplitIds:
    """The saved split: three lists of subject ids, each part non-empty, no id in two parts."""
    try:
        data = read_json_object(path)  # capped like every record fedseg reads back
        parts = {part: data[part] for part in ("train", "val", "test")}
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        message = f"{path}: unreadable split file ({fault_without_path(path, err)}); delete it to split again"
        raise SiteDataError(message, "the site's saved split file is unreadable") from None
    for part, ids in parts.items():
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            _bad_split(path, f"'{part}' must be a list of subject ids")
        if not ids:
            _bad_split(path, f"'{part}' is empty; every part needs at least one subject")
    named = [sid for ids in parts.values() for sid in ids]
    twice = sorted(sid for sid, n in Counter(named).items() if n > 1)
    if twice:
        _bad_split(path, f"{len(twice)} subject id(s) named more than once, e.g. {twice[:3]}")
    return SplitIds(**parts)


def _bad_split(path: Path, fault: str) -> NoReturn:
    raise SiteDataError(
        f"{path}: invalid split file: {fault}; delete it to split again", "the site's saved split file is invalid"
    )
