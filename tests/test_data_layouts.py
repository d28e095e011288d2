"""Site layouts (MSD, plain folders, multi-modal), saved splits and k-folds, preprocessing and its disk cache."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg.data.datalist import SiteDataError, load_datalist
from fedseg.data.datasets import evaluation_dataset, prune_unused, training_dataset
from fedseg.data.sites import load_site_split
from fedseg.data.splits import kfold_ids, split_ids

SHAPE = (10, 12, 8)


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def volume(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1, 2, SHAPE).astype(np.float32)


def ramp_label() -> np.ndarray:
    label = np.zeros(SHAPE, np.uint8)
    label[2:6, 3:9, 2:5] = 1
    label[6:9, 3:9, 2:5] = 2
    return label


def folder_site(root: Path, ids: list[str], modalities: int = 1) -> Path:
    for n, sid in enumerate(ids):
        if modalities == 1:
            save(root / "images" / f"{sid}.nii.gz", volume(n))
        for m in range(modalities if modalities > 1 else 0):
            save(root / "images" / f"{sid}_{m:04d}.nii.gz", volume(n) + 10 * m)
        save(root / "labels" / f"{sid}.nii.gz", ramp_label())
    return root


def test_folder_layout_with_one_file_per_modality(tmp_path: Path) -> None:
    site = folder_site(tmp_path, ["p1", "p2", "p3"], modalities=2)
    items = load_datalist(site)
    assert [item["subject"] for item in items] == ["p1", "p2", "p3"]
    assert [Path(p).name for p in items[0]["image"]] == ["p1_0000.nii.gz", "p1_0001.nii.gz"]
    sample = evaluation_dataset(items)[0]
    assert tuple(sample["image"].shape) == (2, *SHAPE) and tuple(sample["label"].shape) == (1, *SHAPE)
    assert torch.equal(torch.unique(sample["label"]), torch.tensor([0.0, 1.0, 2.0]))


def test_msd_layout_with_4d_channels_and_relative_paths(tmp_path: Path) -> None:
    for i in range(3):
        save(tmp_path / "imagesTr" / f"c{i}.nii.gz", np.stack([volume(i), volume(i) * 3], axis=-1))
        save(tmp_path / "labelsTr" / f"c{i}.nii.gz", ramp_label())
    training = [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(3)]
    manifest = {"labels": {"0": "bg", "1": "a", "2": "b"}, "training": training}
    (tmp_path / "dataset.json").write_text(json.dumps(manifest))
    items = load_datalist(tmp_path)
    assert items[2]["image"] == str(tmp_path / "imagesTr" / "c2.nii.gz")
    image = evaluation_dataset(items)[0]["image"]
    assert tuple(image.shape) == (2, *SHAPE)
    nonzero = image[0] != 0  # z-score per channel on nonzero voxels
    assert abs(float(image[1][nonzero].mean())) < 1e-4 and abs(float(image[1][nonzero].std()) - 1) < 0.01


def test_layout_faults_raise_with_every_fault_named(tmp_path: Path) -> None:
    site = folder_site(tmp_path, ["a", "b", "c"])
    (site / "labels" / "b.nii.gz").unlink()
    save(site / "labels" / "z.nii.gz", ramp_label())
    with pytest.raises(SiteDataError, match=r"b\.nii\.gz: image without label.*z\.nii\.gz: label without image"):
        load_datalist(site)
    with pytest.raises(SiteDataError, match=r"no dataset.json and no images/"):
        load_datalist(tmp_path / "images")


def test_preprocessing_reorients_to_ras_and_resamples(tmp_path: Path) -> None:
    label = ramp_label()
    lps = np.diag([-1.0, -1.0, 2.0, 1.0])  # x and y stored flipped, 2 mm slices
    save(tmp_path / "images" / "ras.nii.gz", volume(0))
    save(tmp_path / "labels" / "ras.nii.gz", label, np.diag([1.0, 1.0, 2.0, 1.0]))
    save(tmp_path / "images" / "lps.nii.gz", volume(0)[::-1, ::-1].copy(), lps)
    save(tmp_path / "labels" / "lps.nii.gz", label[::-1, ::-1].copy(), lps)
    ras, flipped = (evaluation_dataset(load_datalist(tmp_path)[i : i + 1])[0] for i in (1, 0))
    assert torch.equal(ras["label"], flipped["label"])
    resampled = evaluation_dataset(load_datalist(tmp_path)[1:], pixdim=(1.0, 1.0, 1.0))[0]
    assert tuple(resampled["label"].shape[1:3]) == SHAPE[:2] and resampled["label"].shape[3] == 2 * SHAPE[2] - 1
    assert torch.equal(torch.unique(resampled["label"]), torch.tensor([0.0, 1.0, 2.0]))  # nearest: no new values


def test_training_patches_and_disk_cache(tmp_path: Path) -> None:
    site = folder_site(tmp_path / "site", ["a", "b", "c"])
    cache = tmp_path / "cache"
    dataset = training_dataset(load_datalist(site), patch_size=(8, 8, 8), cache_dir=cache, samples_per_volume=3)
    patches = dataset[0]
    assert len(patches) == 3 and all(tuple(p["image"].shape) == (1, 8, 8, 8) for p in patches)
    first_cache = sorted(cache.rglob("*.pt"))
    assert len(first_cache) == 1
    training_dataset(load_datalist(site), patch_size=(8, 8, 8), cache_dir=cache)[0]  # same pipeline: cache hit
    assert sorted(cache.rglob("*.pt")) == first_cache
    bigger = training_dataset(load_datalist(site), patch_size=(16, 16, 16), cache_dir=cache)[0]  # pads: new entry
    assert tuple(bigger[0]["image"].shape) == (1, 16, 16, 16) and len(list(cache.rglob("*.pt"))) == 2
    evaluation_dataset(load_datalist(site), cache_dir=cache)[0]  # whole volumes, no crop indices: own entry
    evaluation_dataset(load_datalist(site), pixdim=(2.0, 2.0, 2.0), cache_dir=cache)[0]  # other grid: new entry
    save(site / "images" / "a.nii.gz", volume(5) * 2)  # an edited scan is never served stale
    fresh = evaluation_dataset(load_datalist(site), cache_dir=cache)[0]
    assert len(list(cache.rglob("*.pt"))) == 5 and float(fresh["image"].std()) == pytest.approx(1.0, abs=0.01)


def test_pipeline_folders_unused_for_long_are_pruned(tmp_path: Path) -> None:
    site = folder_site(tmp_path / "site", ["a", "b", "c"])
    cache = tmp_path / "cache"
    evaluation_dataset(load_datalist(site), pixdim=(2.0, 2.0, 2.0), cache_dir=cache)[0]
    [old] = list(cache.iterdir())
    month_ago = time.time() - 31 * 86400
    os.utime(old, (month_ago, month_ago))
    assert prune_unused(cache) == [old.name] and not old.exists()
    evaluation_dataset(load_datalist(site), cache_dir=cache)[0]
    [current] = list(cache.iterdir())
    os.utime(current, (month_ago, month_ago))
    evaluation_dataset(load_datalist(site), cache_dir=cache)  # opening it again marks it as used
    assert prune_unused(cache) == [] and len(list(current.glob("*.pt"))) == 1


def test_split_is_seeded_disjoint_and_saved(tmp_path: Path) -> None:
    ids = [f"s{i:02d}" for i in range(10)]
    first, again, other = split_ids(ids, seed=1), split_ids(ids, seed=1), split_ids(ids, seed=2)
    assert first == again and first != other
    assert (len(first.test), len(first.val), len(first.train)) == (2, 2, 6)
    assert sorted(first.train + first.val + first.test) == ids
    site = folder_site(tmp_path, ids[:5])
    split = load_site_split(site, seed=3)
    saved = json.loads((site / "splits" / "split-seed3.json").read_text())
    assert saved == {
        "train": [i["subject"] for i in split.train],
        "val": [i["subject"] for i in split.val],
        "test": [i["subject"] for i in split.test],
    }
    saved["train"], saved["test"] = saved["test"], saved["train"]  # an edited file is what the run uses
    (site / "splits" / "split-seed3.json").write_text(json.dumps(saved))
    assert [i["subject"] for i in load_site_split(site, seed=3).test] == saved["test"]
    folder_site(tmp_path, ["s99"])
    with pytest.raises(SiteDataError, match=r"does not match the site's subjects.*not in split: \['s99'\]"):
        load_site_split(site, seed=3)


def test_kfold_holds_each_subject_out_once() -> None:
    ids = [f"s{i}" for i in range(7)]
    folds = kfold_ids(ids, folds=3, seed=0)
    held_out = [sid for _, test in folds for sid in test]
    assert sorted(held_out) == ids
    assert all(sorted(train + test) == ids and not set(train) & set(test) for train, test in folds)
    assert kfold_ids(ids, folds=3, seed=0) == folds and kfold_ids(ids, folds=3, seed=1) != folds
    with pytest.raises(SiteDataError, match="k-fold needs"):
        kfold_ids(ids, folds=8, seed=0)


def test_too_few_subjects_to_split() -> None:
    with pytest.raises(SiteDataError, match="need at least 3 subjects") as caught:
        split_ids(["a", "b"], seed=0)
    assert caught.value.public == "site data invalid: need at least 3 subjects to split into train/val/test, got 2"
