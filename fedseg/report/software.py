"""The report's software section: which versions the arms of one or more results folders ran with
(fedseg.software, recorded in each arm.json), and a warning when they differ."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from fedseg.report.cases import CasesError
from fedseg.report.layout import ARM_INFO, ARMS
from fedseg.software import describe


def recorded(results_dir: Path) -> list[dict[str, str]]:
    """The software of every finished arm of `results_dir` ({} where its arm.json predates the record)."""
    found = []
    for path in sorted((results_dir / ARMS).glob(f"*/{ARM_INFO}")):
        try:
            software = json.loads(path.read_text()).get("software", {})
        except (OSError, ValueError, AttributeError) as err:
            raise CasesError(f"{path}: not a readable arm record ({type(err).__name__})") from None
        if not isinstance(software, dict) or not all(isinstance(v, str) for v in software.values()):
            raise CasesError(f"{path}: 'software' must map package names to version strings")
        found.append({str(name): value for name, value in software.items()})
    return found


def software_section(results_dirs: Sequence[Path]) -> str:
    """Each distinct software set with the runs (and arm counts) that used it; a warning when there are several."""
    where: dict[str, list[str]] = {}
    for results_dir in results_dirs:
        for text, count in Counter(describe(s) for s in recorded(results_dir)).items():
            where.setdefault(text, []).append(f"{results_dir.resolve().name} ({count} arm{'s' * (count > 1)})")
    if not where:
        return "No arm records (`arms/*/arm.json`) beside the cases: the software is not known."
    unknown = describe({}) in where
    if len(where) - unknown > 1:
        note = (
            "**The arms ran with different software.** The same config and seed give other figures under other "
            "versions: compare figures within one software set."
        )
    elif unknown:
        note = (
            "Some arms have no software record (their arm.json predates it), so their versions are not known; "
            "the same config and seed give other figures under other versions."
        )
    else:
        note = "Every arm ran with this software; with it, the same configs and seeds give the same figures."
    return "\n".join([note, "", *(f"- {text}: {', '.join(runs)}" for text, runs in where.items())])
