"""The software a run trained with, recorded in its history.json (and an experiment arm's arm.json) and
printed by `fedseg report`: the same config and seed give other figures under another torch, MONAI or
Flower build, so a figure is reproducible only together with these versions."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

PACKAGES = ("fedseg", "torch", "monai", "flwr", "numpy", "scipy", "nibabel", "opacus")
SOFTWARE = "software"  # history.json: the versions a run trained under, one entry per change
FROM_ROUND = "from-round"


def software_versions() -> dict[str, str]:
    """Python's version and each installed package of PACKAGES' (torch's includes its build, e.g. +cpu)."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions


def describe(versions: dict[str, str]) -> str:
    """One line, e.g. "torch 2.13.0+cpu, monai 1.6.1, …"; "not recorded" for an empty record."""
    return ", ".join(f"{name} {value}" for name, value in versions.items()) or "not recorded"


def note_software(record: dict[str, Any], first_round: int) -> None:
    """Append this process's versions to `record["software"]` (a run's history.json), with the round
    they train from, unless the last entry already has them: a run resumed under other software shows it."""
    entries = record.setdefault(SOFTWARE, [])
    current = software_versions()
    if not entries or {k: v for k, v in entries[-1].items() if k != FROM_ROUND} != current:
        entries.append({FROM_ROUND: first_round, **current})
