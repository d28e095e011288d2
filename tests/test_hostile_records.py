"""Site-local JSON files fedseg reads back (a split, the validation memo, the privacy ledger, a bundle's
metadata.json) are read through the capped record reader: an oversized or hostile one is a one-line
fault or is ignored, never loaded whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_bundle import make_bundle

import fedseg.json_records
from fedseg.bundle import read_bundle
from fedseg.data.datalist import SiteDataError
from fedseg.data.splits import load_or_make_split
from fedseg.data.validation_memo import FORMAT, ValidationMemo
from fedseg.privacy import PrivacyLedger

CAP = 256  # bytes, instead of 64 MiB


@pytest.fixture
def small_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fedseg.json_records, "MAX_RECORD_BYTES", CAP)


def items(count: int) -> list[dict[str, str]]:
    return [{"subject": f"s{i}", "image": f"s{i}.nii.gz", "label": f"s{i}-seg.nii.gz"} for i in range(count)]


def test_an_oversized_split_file_is_one_line_naming_it(tmp_path: Path, small_cap: None) -> None:
    path = tmp_path / "split-seed0.json"
    path.write_text(json.dumps({"train": ["s0", "s1", "s2"], "val": ["s3"], "test": ["s4"], "pad": "x" * CAP}))
    with pytest.raises(SiteDataError, match=r"split-seed0.json: unreadable split file .*larger than the") as err:
        load_or_make_split(items(5), 0, tmp_path)
    assert "\n" not in str(err.value) and str(err.value).count(str(path)) == 1, err.value


def test_a_split_file_within_the_cap_is_still_reused(tmp_path: Path) -> None:
    (tmp_path / "split-seed0.json").write_text(json.dumps({"train": ["s4", "s0", "s1"], "val": ["s3"], "test": ["s2"]}))
    split = load_or_make_split(items(5), 0, tmp_path)
    assert [[i["subject"] for i in part] for part in (split.train, split.val, split.test)] == [
        ["s4", "s0", "s1"],
        ["s3"],
        ["s2"],
    ]


def test_an_oversized_validation_memo_is_ignored_not_loaded(tmp_path: Path, small_cap: None) -> None:
    entry = {"problems": [], "channels": 1}
    for name, pad in (("small.json", ""), ("padded.json", "x" * CAP)):
        (tmp_path / name).write_text(json.dumps({"format": FORMAT, "subjects": {"k": entry}, "pad": pad}))
    assert ValidationMemo(tmp_path / "small.json").get("k") == ([], 1)
    assert ValidationMemo(tmp_path / "padded.json").get("k") is None  # checked again rather than trusted


def test_a_validation_memo_whose_subjects_are_no_mapping_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "memo.json").write_text(json.dumps({"format": FORMAT, "subjects": []}))
    assert ValidationMemo(tmp_path / "memo.json").get("k") is None


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        (json.dumps({"history": [[1.0, 0.1, 3]], "pad": "x" * CAP}), "larger than the"),
        ('{"history": [[1.0, 0.1, 1e999]]}', "OverflowError|cannot convert float infinity"),
        ('{"history": ' + "[" * 100_000 + "]" * 100_000 + "}", "not a readable JSON record"),
        ('{"history": [[NaN, 0.1, 3]]}', "is not a finite noise"),
        ('{"history": [[1.0, 1.5, 3]]}', "is not a finite noise"),
        ('{"history": [[1.0, 0.1, -3]]}', "is not a finite noise"),
    ],
)
def test_a_hostile_privacy_ledger_refuses_to_train_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, fault: str
) -> None:
    if "pad" in text:
        monkeypatch.setattr(fedseg.json_records, "MAX_RECORD_BYTES", CAP)
    path = tmp_path / "run-x.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"run-x.json: (unreadable )?privacy ledger .*({fault})") as err:
        PrivacyLedger(path).load()
    assert "\n" not in str(err.value) and str(err.value).count(str(path)) == 1, err.value


def test_an_oversized_bundle_metadata_is_no_description(tmp_path: Path, small_cap: None) -> None:
    for name, pad in (("small", ""), ("padded", "x" * CAP)):
        make_bundle(tmp_path / name)
        (tmp_path / name / "configs" / "metadata.json").write_text(
            json.dumps({"name": "seg", "version": "1", "pad": pad})
        )
    assert read_bundle(tmp_path / "small").description == "seg 1"
    assert read_bundle(tmp_path / "padded").description == "padded"  # the folder's name, nothing loaded
