"""Cohorts sized for DP measurements: `synthesize(subjects=...)` sets the base subject count per site."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedseg.data.synth import INSTITUTIONS, OUTSIDE, synthesize


def test_subjects_sets_the_base_count_scaled_by_each_institution(tmp_path: Path) -> None:
    folders = synthesize(tmp_path, "tiny", num_sites=4, subjects=20)
    counts = [json.loads((f / "dataset.json").read_text())["numTraining"] for f in folders]
    expected = [round(20 * INSTITUTIONS[k % 3].subjects) for k in range(4)] + [round(20 * OUTSIDE.subjects)]
    assert counts == expected == [20, 12, 30, 20, 10]


def test_negative_subjects_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="subjects must be >= 0"):
        synthesize(tmp_path, "tiny", subjects=-1)
