"""The software a run trained with, recorded in its history.json (and an experiment arm's arm.json) and
printed by `fedseg report`: the same config and seed give other figures under another fedseg revision,
torch, MONAI or Flower build, or thread count, so a figure is reproducible only together with these."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from flwr.serverapp import Grid

PACKAGES = ("fedseg", "torch", "monai", "flwr", "numpy", "scipy", "nibabel", "opacus")
SOFTWARE = "software"  # history.json: the versions a run trained under, one entry per change
FROM_ROUND = "from-round"
COMMIT = "fedseg-commit"  # the git revision of a source checkout, "+dirty" with uncommitted changes
FLOWER_APP = "flower-app"  # the FAB Flower ran (`flwr run`, a deployment): "sha256:<hash> <fab id> <version>"
ORDER = ("python", *PACKAGES, COMMIT, FLOWER_APP, "cuda", "torch-threads")  # how `describe` lists the names it knows


def software_versions() -> dict[str, str]:
    """Python's version, each installed package of PACKAGES' (torch's with its build, e.g. +cpu), fedseg's
    git revision when it runs from a checkout, torch's CUDA version when it has one, and its CPU threads."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    if revision := _source_revision():
        versions[COMMIT] = revision
    if torch.version.cuda:
        versions["cuda"] = str(torch.version.cuda)
    versions["torch-threads"] = str(torch.get_num_threads())
    return versions


def describe(versions: dict[str, str]) -> str:
    """One line in ORDER (other names after, sorted), e.g. "python 3.11.7, fedseg 0.1.0, torch 2.13.0+cpu, …";
    "not recorded" for an empty record."""
    rank = {name: index for index, name in enumerate(ORDER)}
    names = sorted(versions, key=lambda name: (rank.get(name, len(ORDER)), name))
    return ", ".join(f"{name} {versions[name]}" for name in names) or "not recorded"


def flower_app(grid: Grid) -> dict[str, str]:
    """{FLOWER_APP: ...} when Flower started the run from a FAB (`flwr run`, a deployed federation): it names
    the exact app code, which is Flower's unpacked copy and so has no git commit; {} for a grid without one
    (an experiment's in-process grid)."""
    try:
        run = grid.run
    except (AttributeError, TypeError):  # a Grid whose runtime has set no Run
        return {}
    fab_hash = str(getattr(run, "fab_hash", "") or "")
    if not fab_hash:
        return {}
    parts = (f"sha256:{fab_hash}", str(getattr(run, "fab_id", "") or ""), str(getattr(run, "fab_version", "") or ""))
    return {FLOWER_APP: " ".join(part for part in parts if part)}  # the hash first: a report cuts long values


def note_software(record: dict[str, Any], first_round: int, app: dict[str, str] | None = None) -> None:
    """Append this process's versions (and `app`, the FAB it runs: `flower_app`) to `record["software"]`
    (a run's history.json), with the round they train from, unless the last entry already has them: a run
    resumed under other software shows it."""
    entries = record.setdefault(SOFTWARE, [])
    current = {**software_versions(), **(app or {})}
    if not entries or {k: v for k, v in entries[-1].items() if k != FROM_ROUND} != current:
        entries.append({FROM_ROUND: first_round, **current})


@functools.cache  # once per process, at its first record: the code it runs, even if the checkout changes later
def _source_revision() -> str:
    """fedseg's git commit when imported from a git checkout ("" otherwise or without git)."""
    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / ".git").exists():
        return ""
    try:
        head = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return head + ("+dirty" if dirty else "")
