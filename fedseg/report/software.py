"""The report's software section: which versions the arms of one or more results folders ran with
(fedseg.software: each arm's arm.json, and its history.json's entries when it was resumed), and a
warning when they differ or are not known."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedseg.json_records import read_json_object
from fedseg.report.cases import CaseRow, CasesError
from fedseg.report.layout import ARM_INFO, ARMS, HISTORY, trained_in
from fedseg.software import FROM_ROUND, SOFTWARE, describe

NOT_RECORDED = describe({})
MAX_VALUE = 200  # characters of one recorded version kept in the report


def arm_software(results_dir: Path, rows: Sequence[CaseRow]) -> dict[str, str]:
    """Arm id → the software it ran with, described on one line, for every arm that trained a model of `rows`
    (the folder's cases; a personal model's is its federated arm):
    "not recorded" without a record, "mixed: …" when a resume trained part of it under other versions."""
    found = {}
    for arm in dict.fromkeys(trained_in(row.arm, row.kind, row.trained_on) for row in rows):
        folder = results_dir / ARMS / arm
        recorded = _versions(_load(folder / ARM_INFO).get(SOFTWARE, {}), folder / ARM_INFO)
        sets = [*_history_sets(folder / HISTORY), recorded]
        distinct = list(dict.fromkeys(describe(s) for s in sets if s))
        found[arm] = "mixed: " + " | ".join(distinct) if len(distinct) > 1 else (distinct or [NOT_RECORDED])[0]
    return found


def software_section(results_dirs: Sequence[tuple[str, Path, Sequence[CaseRow]]]) -> str:
    """Each distinct software set with the runs (label, folder, its cases) and arm counts that used it, and
    a note saying whether the arms ran with one set, with several, or (some of them) without a record."""
    where: dict[str, list[str]] = {}
    for label, results_dir, rows in results_dirs:
        for text, count in Counter(arm_software(results_dir, rows).values()).items():
            where.setdefault(text, []).append(f"{label} ({count} arm{'s' * (count > 1)})")
    known = [text for text in where if text != NOT_RECORDED]
    notes = []
    if len(known) > 1:
        notes.append(
            "**The arms ran with different software.** The same config and seed give other figures under "
            "other versions: compare figures within one software set."
        )
    if NOT_RECORDED in where:
        notes.append(
            ("Some arms have no software record" if known else "No arm has a software record")
            + " (arm.json and history.json from before fedseg kept one): the versions they ran with are not "
            "known, and the same config and seed give other figures under other versions."
        )
    if not notes:
        notes.append("Every arm ran with this one software set; compare these figures with runs made with it.")
    return "\n".join([" ".join(notes), "", *(f"- {text}: {', '.join(runs)}" for text, runs in where.items())])


def _load(path: Path) -> dict[str, Any]:
    """A JSON object file ({} when there is none); CasesError naming it when it is not one."""
    if not path.is_file():
        return {}
    try:
        return read_json_object(path)
    except ValueError as err:
        raise CasesError(str(err)) from None


def _history_sets(path: Path) -> list[dict[str, str]]:
    entries = _load(path).get(SOFTWARE, [])
    if not isinstance(entries, list):
        raise CasesError(f"{path}: '{SOFTWARE}' must be a list of version records")
    return [
        _versions({k: v for k, v in e.items() if k != FROM_ROUND} if isinstance(e, dict) else e, path) for e in entries
    ]


def _versions(value: object, path: Path) -> dict[str, str]:
    """A record's {name: version}, each on one line and at most MAX_VALUE characters; CasesError otherwise."""
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise CasesError(f"{path}: '{SOFTWARE}' must map package names to version strings")
    return {" ".join(k.split())[:MAX_VALUE]: " ".join(v.split())[:MAX_VALUE] for k, v in value.items()}
