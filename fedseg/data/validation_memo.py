"""Remembered per-subject validation results, so a site re-reads only scans that changed.

A site validates its data before every message it answers; in deployment each message is a fresh
process, so without a memo every voxel of every scan would be read again each time. An entry is
reused only while the subject's files keep their size and modification time and the checks'
settings (allowed label values, affine tolerance) are the same; anything else is checked afresh. The memo lives
in the site's own state folder and never leaves the site.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from fedseg.atomic import atomic_write_text
from fedseg.data.datalist import Problem, Subject, file_stamps
from fedseg.json_records import read_json_object

FORMAT = "fedseg-validation-memo/1"


class ValidationMemo:
    """Subject results keyed by their files' (path, size, mtime) and the check settings."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries = self._load()
        self._used: dict[str, dict] = {}

    def key(self, subject: Subject, label_values: list[int] | None, tolerance: float) -> str | None:
        """The subject's key, or None when a file cannot be inspected (it is then checked, not memoised)."""
        try:
            return json.dumps([file_stamps((*subject.images, subject.label)), label_values, tolerance])
        except OSError:
            return None

    def get(self, key: str | None) -> tuple[list[Problem], int | None] | None:
        """The remembered (problems, channels) of an unchanged subject, else None."""
        entry = self._entries.get(key) if key is not None else None
        if key is None or entry is None:
            return None
        try:
            found = [Problem(**p) for p in entry["problems"]], entry["channels"]
        except (TypeError, KeyError):  # a damaged entry: check the subject again
            return None
        self._used[key] = entry
        return found

    def put(self, key: str | None, problems: list[Problem], channels: int | None) -> None:
        if key is not None:
            self._used[key] = {"problems": [asdict(p) for p in problems], "channels": channels}

    def save(self) -> None:
        """Keep exactly the entries of this validation (entries of removed or changed files go)."""
        if self.path is not None and self._used != self._entries:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path, json.dumps({"format": FORMAT, "subjects": self._used}))

    def _load(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:
            data = read_json_object(self.path)  # capped like every record fedseg reads back
        except ValueError:
            return {}  # missing or damaged memo: validate everything again
        subjects = data.get("subjects") if data.get("format") == FORMAT else None
        return subjects if isinstance(subjects, dict) else {}
