"""`validate_site` finds each kind of fault, names the file, and reports all faults at once."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedseg.data.datalist import SiteDataError
from fedseg.data.validate import check_site, validate_site

SHAPE = (12, 12, 10)


def save(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)
    return path


def image() -> np.ndarray:
    return np.random.default_rng(0).normal(100, 10, SHAPE).astype(np.float32)


def label(value: int = 1) -> np.ndarray:
    out = np.zeros(SHAPE, np.uint8)
    out[3:8, 3:8, 3:7] = value
    return out


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A valid plain-folder site with five subjects."""
    for i in range(5):
        save(tmp_path / "images" / f"case{i}.nii.gz", image())
        save(tmp_path / "labels" / f"case{i}.nii.gz", label())
    return tmp_path


def kinds(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for problem in report.problems:
        out.setdefault(problem.kind, []).append(Path(problem.file).name)
    return out


def test_valid_site_has_no_problems(site: Path) -> None:
    report = validate_site(site, num_classes=2, channels=1)
    assert report.ok and report.problems == [] and report.subjects == 5 and report.layout == "folders"


def test_truncated_file_is_unreadable(site: Path) -> None:
    path = site / "images" / "case1.nii.gz"
    path.write_bytes(path.read_bytes()[:200])
    report = validate_site(site)
    assert kinds(report) == {"unreadable": ["case1.nii.gz"]}
    assert "truncated" in report.errors[0].fault


def test_not_3d_or_4d(site: Path) -> None:
    save(site / "images" / "case0.nii.gz", image()[:, :, 0])
    save(site / "labels" / "case2.nii.gz", np.zeros((*SHAPE, 2), np.uint8))
    report = validate_site(site)
    assert kinds(report) == {"dimensions": ["case0.nii.gz", "case2.nii.gz"]}
    assert "got shape (12, 12)" in report.errors[0].fault


def test_shape_mismatch(site: Path) -> None:
    save(site / "labels" / "case3.nii.gz", label()[:, :, :8])
    report = validate_site(site)
    assert kinds(report) == {"shape-mismatch": ["case3.nii.gz"]}
    assert "(12, 12, 8)" in report.errors[0].fault and "(12, 12, 10)" in report.errors[0].fault


def test_spacing_and_origin_mismatch_beyond_tolerance(site: Path) -> None:
    save(site / "labels" / "case0.nii.gz", label(), np.diag([1.0, 1.0, 2.5, 1.0]))
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    save(site / "labels" / "case1.nii.gz", label(), shifted)
    nearly = np.eye(4)
    nearly[0, 3] = 1e-5  # within the default tolerance
    save(site / "labels" / "case2.nii.gz", label(), nearly)
    report = validate_site(site)
    assert kinds(report) == {"affine-mismatch": ["case0.nii.gz", "case1.nii.gz"]}
    assert "spacing 1, 1, 2.5 mm" in report.errors[0].fault
    assert "by up to 0.5" in report.errors[1].fault


def test_non_finite_voxels(site: Path) -> None:
    bad = image()
    bad[0, 0, :3] = np.nan
    bad[1, 1, 1] = np.inf
    save(site / "images" / "case2.nii.gz", bad)
    report = validate_site(site)
    assert kinds(report) == {"non-finite": ["case2.nii.gz"]}
    assert report.errors[0].fault.startswith("4 NaN, infinite or out-of-range")


@pytest.mark.parametrize(("value", "dtype"), [(1e35, np.float32), (-(10**15), np.int64)])
def test_voxels_past_any_scanner_are_out_of_range(site: Path, value: float, dtype: type) -> None:
    # finite, but float32 normalisation of such a scan overflows into NaN: the model would see garbage
    bad = image().astype(dtype)
    bad[2, 2, :5] = value
    nib.save(nib.Nifti1Image(bad, np.eye(4), dtype=dtype), site / "images" / "case2.nii.gz")
    report = validate_site(site)
    assert kinds(report) == {"non-finite": ["case2.nii.gz"]}
    assert report.errors[0].fault == "5 NaN, infinite or out-of-range (|value| > 1e+12) voxels"


def test_label_values_outside_classes_or_non_integer(site: Path) -> None:
    save(site / "labels" / "case0.nii.gz", label(value=3))
    save(site / "labels" / "case1.nii.gz", label().astype(np.float32) * 0.5)
    report = validate_site(site, num_classes=3)
    assert kinds(report) == {"label-values": ["case0.nii.gz", "case1.nii.gz"]}
    assert "values 3 outside the declared classes 0..2" in report.errors[0].fault
    assert "non-integer label values, e.g. 0.5" in report.errors[1].fault


def test_empty_label_is_a_warning(site: Path) -> None:
    save(site / "labels" / "case3.nii.gz", np.zeros(SHAPE, np.uint8))
    report = validate_site(site)
    assert report.ok and [(p.severity, p.kind) for p in report.problems] == [("warning", "empty-label")]


def test_image_without_label_and_label_without_image(site: Path) -> None:
    save(site / "images" / "lonely.nii.gz", image())
    save(site / "labels" / "orphan.nii.gz", label())
    report = validate_site(site)
    assert kinds(report) == {"image-without-label": ["lonely.nii.gz"], "label-without-image": ["orphan.nii.gz"]}


def test_channel_count_differs_from_config(site: Path) -> None:
    save(site / "images" / "case1.nii.gz", np.stack([image(), image()], axis=-1))  # 4D: two channels
    report = validate_site(site, channels=2)
    assert sorted(kinds(report)["channels"]) == ["case0.nii.gz", "case2.nii.gz", "case3.nii.gz", "case4.nii.gz"]
    without_config = validate_site(site)
    assert kinds(without_config) == {"channels": ["case1.nii.gz"]}
    assert "2 image channels, most subjects have 1" in without_config.errors[0].fault


def test_duplicate_subject_ids(site: Path, tmp_path: Path) -> None:
    save(site / "images" / "case2.nii", image())  # same id as case2.nii.gz
    assert kinds(validate_site(site)) == {"duplicate-id": ["case2.nii.gz"]}

    msd = tmp_path / "msd"
    entry = {"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}
    for i in ("a", "b", "c"):
        save(msd / "imagesTr" / f"{i}.nii.gz", image())
        save(msd / "labelsTr" / f"{i}.nii.gz", label())
    training = [entry, entry] + [{"image": f"./imagesTr/{i}.nii.gz", "label": f"./labelsTr/{i}.nii.gz"} for i in "bc"]
    (msd / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "fg"}, "training": training}))
    report = validate_site(msd)
    assert kinds(report) == {"duplicate-id": ["a.nii.gz"]} and "'a'" in report.errors[0].fault


def test_too_few_subjects_for_the_split(site: Path) -> None:
    for i in (1, 2, 3, 4):
        (site / "images" / f"case{i}.nii.gz").unlink()
        (site / "labels" / f"case{i}.nii.gz").unlink()
    report = validate_site(site)
    assert kinds(report) == {"too-few-subjects": [site.name]}
    assert "1 usable subjects" in report.errors[0].fault


def test_every_problem_is_reported_and_public_summary_has_no_paths(site: Path) -> None:
    path = site / "images" / "case0.nii.gz"
    path.write_bytes(path.read_bytes()[:100])
    save(site / "labels" / "case1.nii.gz", label(value=7))
    save(site / "labels" / "extra.nii.gz", label())
    report = validate_site(site, num_classes=2)
    assert set(kinds(report)) == {"unreadable", "label-values", "label-without-image"}
    with pytest.raises(SiteDataError) as caught:
        check_site(site, num_classes=2)
    assert "case0.nii.gz" in str(caught.value)
    assert caught.value.public == "site data invalid: 1 x label-values, 1 x label-without-image, 1 x unreadable"
    assert str(site) not in caught.value.public
