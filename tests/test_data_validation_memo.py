"""The validation memo: unchanged scans are not read again; changed, truncated or new ones are."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import pytest
from test_data_validate import image, label, save

import fedseg.data.nifti_guard as nifti_guard
from fedseg.data.validate import validate_site


@pytest.fixture
def site(tmp_path: Path) -> Path:
    for i in range(5):
        save(tmp_path / "site" / "images" / f"case{i}.nii.gz", image())
        save(tmp_path / "site" / "labels" / f"case{i}.nii.gz", label())
    return tmp_path / "site"


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the files the validator loads, in order."""
    seen: list[str] = []
    load = nib.load

    def counting_load(path, *args, **kwargs):  # noqa: ANN002, ANN003
        seen.append(Path(path).name)
        return load(path, *args, **kwargs)

    monkeypatch.setattr(nifti_guard.nib, "load", counting_load)
    return seen


def test_unchanged_scans_are_not_read_again_and_a_touched_one_is(site: Path, tmp_path: Path, reads: list[str]) -> None:
    memo = tmp_path / "state" / "validated.json"
    assert validate_site(site, num_classes=2, memo_file=memo).ok
    assert len(reads) == 10
    reads.clear()
    assert validate_site(site, num_classes=2, memo_file=memo).ok
    assert reads == []
    os.utime(site / "labels" / "case3.nii.gz")  # same bytes, new modification time
    assert validate_site(site, num_classes=2, memo_file=memo).ok
    assert reads == ["case3.nii.gz", "case3.nii.gz"]  # the subject's image and label
    reads.clear()
    assert validate_site(site, num_classes=3, memo_file=memo).ok  # other settings: everything again
    assert len(reads) == 10


def test_a_scan_truncated_after_a_clean_check_is_reported(site: Path, tmp_path: Path) -> None:
    memo = tmp_path / "state" / "validated.json"
    assert validate_site(site, memo_file=memo).ok
    broken = site / "images" / "case1.nii.gz"
    broken.write_bytes(broken.read_bytes()[:200])
    report = validate_site(site, memo_file=memo)
    assert [(p.kind, Path(p.file).name) for p in report.errors] == [("unreadable", "case1.nii.gz")]
    assert [(p.kind, Path(p.file).name) for p in validate_site(site, memo_file=memo).errors] == [
        ("unreadable", "case1.nii.gz")
    ], "a remembered error is still an error"


def test_a_damaged_memo_means_checking_everything(site: Path, tmp_path: Path, reads: list[str]) -> None:
    memo = tmp_path / "validated.json"
    memo.write_text('{"format": "fedseg-validation-memo/1", "subjects": {"x": {"problems": 3}}')
    assert validate_site(site, memo_file=memo).ok
    assert len(reads) == 10
    reads.clear()
    memo.write_text(memo.read_text().replace('"channels"', '"chanels"'))
    assert validate_site(site, memo_file=memo).ok
    assert len(reads) == 10
