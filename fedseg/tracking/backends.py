"""The tracking backends by name, the run-config value that selects them, and opening them for a run."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fedseg.tracking import mlflow_tracker, tensorboard_tracker
from fedseg.tracking.base import NullTracker, Tracker, TrackerGroup

if TYPE_CHECKING:
    from fedseg.config import RunConfig

TrackerFactory = Callable[[Path, str, str], Tracker]  # (tracking root, run name, experiment name)
# name → (factory, packages it needs); a new backend is one module with a tracker class and its PACKAGES
BACKENDS: dict[str, tuple[TrackerFactory, tuple[str, ...]]] = {
    "tensorboard": (tensorboard_tracker.TensorBoardTracker, tensorboard_tracker.PACKAGES),
    "mlflow": (mlflow_tracker.MLflowTracker, mlflow_tracker.PACKAGES),
}


def parse_backends(value: str) -> list[str]:
    """`"tensorboard,mlflow"` → ["tensorboard", "mlflow"] ("" → none); ValueError on an unknown name."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown:
        raise ValueError(f"unknown tracking backend {unknown[0]!r}; choose from: {', '.join(BACKENDS)}")
    return list(dict.fromkeys(names))


def missing_packages(names: list[str]) -> list[str]:
    """The packages the named backends need that this Python environment lacks."""
    needed = [package for name in names for package in BACKENDS[name][1]]
    return [package for package in dict.fromkeys(needed) if importlib.util.find_spec(package) is None]


def open_tracker(value: str, root: Path, run_name: str, experiment: str = "fedseg") -> Tracker:
    """The trackers selected by run-config `tracking` (`value`), writing under `root`; NullTracker for ""."""
    names = parse_backends(value)
    if not names:
        return NullTracker()
    return TrackerGroup([BACKENDS[name][0](root, run_name, experiment) for name in names])


def open_run_tracker(config: RunConfig, run_dir: Path, experiment: str = "fedseg") -> Tracker:
    """The trackers of run-config `tracking` for the run in `run_dir`, under `tracking-dir` (default: the
    folder holding the run folders, so that one TensorBoard / MLflow view shows them all); ConfigError
    when a backend's package is not installed where the server runs."""
    from fedseg.config import (
        ConfigError,  # fedseg.config validates `tracking` with parse_backends
    )

    names = parse_backends(config.tracking)
    missing = missing_packages(names)
    if missing:
        raise ConfigError(
            f"run-config 'tracking' is '{config.tracking}' but {', '.join(missing)} is not installed "
            "where the server runs: pip install 'fedseg[tracking]'"
        )
    root = Path(config.tracking_dir).expanduser().resolve() if config.tracking_dir else run_dir.parent
    return open_tracker(config.tracking, root, run_dir.name, experiment)
