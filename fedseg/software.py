"""The software an experiment arm ran with, recorded in its arm.json and printed by `fedseg report`:
the same config and seed give other figures under another torch, MONAI or Flower build, so a figure
is reproducible only together with these versions."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = ("fedseg", "torch", "monai", "flwr", "numpy", "scipy", "nibabel", "opacus")


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
