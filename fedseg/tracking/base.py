"""The Tracker interface and what every backend logs: the run config once, then one step per round."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fedseg.history import RoundRecord
from fedseg.messages import SITE_ID

FEDERATION = "federation"  # metric prefix of the values over all sites (site values: "<site>/<stage>/<metric>")


class Tracker(Protocol):
    """Receives a run's config once and every finished round (round 0: the initial model)."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_round(self, record: RoundRecord) -> None: ...

    def close(self, failed: bool = False) -> None: ...


class NullTracker:
    """Tracking off."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_round(self, record: RoundRecord) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class TrackerGroup:
    """Several trackers fed the same calls (e.g. TensorBoard and MLflow)."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.log_config(config)

    def log_round(self, record: RoundRecord) -> None:
        for tracker in self.trackers:
            tracker.log_round(record)

    def close(self, failed: bool = False) -> None:
        for tracker in self.trackers:
            tracker.close(failed)


def round_metrics(record: RoundRecord) -> dict[str, float]:
    """The round's finite numbers by name: federation means, then every site's evaluation and training metrics."""
    values = {
        f"{FEDERATION}/mean-dice": record.mean_dice,
        f"{FEDERATION}/val-dice": record.val_dice,
        f"{FEDERATION}/train-loss": record.train_loss,
        f"{FEDERATION}/seconds": record.seconds,
        f"{FEDERATION}/sites-evaluated": float(len(record.eval)),
        f"{FEDERATION}/failures": float(len(record.failures)),
    }
    for stage, sites in (("eval", record.eval), ("train", record.train)):
        for site, metrics in sites.items():
            values.update({f"{site}/{stage}/{key}": value for key, value in metrics.items() if key != SITE_ID})
    return {key: float(value) for key, value in values.items() if math.isfinite(value)}


def flat_config(config: Mapping[str, Any]) -> dict[str, str]:
    """The run config as text values by key, sorted; a nested table (the strategy parameters, already
    dotted keys such as "fedprox.proximal-mu") is merged in."""
    flat: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update({str(k): str(v) for k, v in value.items()})
        else:
            flat[key] = str(value)
    return dict(sorted(flat.items()))
