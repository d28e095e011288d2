"""Atomic writes: a failed write leaves the previous file and no temporary behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.atomic import atomic_path, atomic_write_text


def test_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "history.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["history.json"]


def test_write_creates_missing_folders(tmp_path: Path) -> None:
    target = tmp_path / "site" / "splits" / "split-seed0.json"
    atomic_write_text(target, "{}")
    assert target.read_text() == "{}"
