"""Opt-in experiment tracking: per-round, per-site metrics and the run config (run-config `tracking`).

One small interface, `Tracker` (fedseg.tracking.base); a backend is a module with a `Tracker`
class registered in `BACKENDS` (fedseg.tracking.backends). history.json and the plots never
depend on a tracker.
"""

from fedseg.tracking.backends import (
    BACKENDS,
    missing_packages,
    open_run_tracker,
    open_tracker,
    parse_backends,
)
from fedseg.tracking.base import NullTracker, Tracker, TrackerGroup, round_metrics

__all__ = [
    "BACKENDS",
    "NullTracker",
    "Tracker",
    "TrackerGroup",
    "missing_packages",
    "open_run_tracker",
    "open_tracker",
    "parse_backends",
    "round_metrics",
]
