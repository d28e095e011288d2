"""history.json: per round, per-site and mean Dice, train loss, seconds and failures."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.atomic import atomic_write_text
from fedseg.messages import VAL_DICE


@dataclass
class RoundRecord:
    """What happened in one round (round 0 is the initial model, evaluated only)."""

    round: int
    eval: dict[str, dict[str, float]] = field(default_factory=dict)
    train: dict[str, dict[str, float]] = field(default_factory=dict)
    failures: list[dict[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    rejoined: list[str] = field(default_factory=list)
    strategy: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def mean_dice(self) -> float:
        """Unweighted mean over sites of each site's test Dice (every site counts once)."""
        return _mean(site["dice"] for site in self.eval.values())

    @property
    def val_dice(self) -> float:
        """Unweighted mean over sites of the global model's validation Dice (NaN when no site sent one)."""
        return _mean(site[VAL_DICE] for site in self.eval.values() if VAL_DICE in site)

    @property
    def train_loss(self) -> float:
        return _mean(site["train-loss"] for site in self.train.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "mean_dice": self.mean_dice,
            "val_dice": self.val_dice,
            "train_loss": self.train_loss,
            "seconds": self.seconds,
            "eval": self.eval,
            "train": self.train,
            "failures": self.failures,
            "dropped": self.dropped,
            "rejoined": self.rejoined,
            "strategy": self.strategy,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundRecord:
        """Inverse of `to_dict` (derived values such as mean_dice are recomputed, not read)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


@dataclass
class History:
    """All rounds of one run plus its config; saved atomically after every round."""

    config: dict[str, Any]
    rounds: list[RoundRecord] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_dice(self) -> float:
        return self.rounds[-1].mean_dice if self.rounds else math.nan

    @property
    def best_round(self) -> int | None:
        """The trained round whose global model has the best mean validation Dice (the earliest on ties)."""
        scored = [(r.val_dice, -r.round) for r in self.rounds if r.round > 0 and not math.isnan(r.val_dice)]
        return -max(scored)[1] if scored else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "rounds": [r.to_dict() for r in self.rounds],
            "best_round": self.best_round,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        """Inverse of `to_dict`: the history a checkpoint or history.json holds."""
        extra = {key: value for key, value in data.items() if key not in ("config", "rounds", "best_round")}
        return cls(config=data["config"], rounds=[RoundRecord.from_dict(r) for r in data["rounds"]], extra=extra)

    def save(self, path: Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=True))


def _mean(values: Any) -> float:
    items = [float(v) for v in values]
    return sum(items) / len(items) if items else math.nan
