"""The run folder's checkpoint: everything needed to continue a run after the server died.

`checkpoint.pt` is rewritten atomically after every finished round. It holds the global
weights, the round, the strategy's state (`strategy.state_dict()`, e.g. a privacy
accountant, or a server optimizer's moments as tensors), the server's random number generator
states, the history, which Flower node is which site (so a resumed run names a site that
dies before it answers) and the running weight average (`swa-rounds`). It is loaded
with `torch.load(weights_only=True)`: only tensors and plain Python values, no pickled code.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedseg.atomic import atomic_path
from fedseg.config import ConfigError, RunConfig
from fedseg.data.sites import with_input_channels
from fedseg.history import History
from fedseg.weight_average import WeightAverage, state_problem

CHECKPOINT_FILE = "checkpoint.pt"
FORMAT_VERSION = 1
# Keys that may differ between the interrupted run and its resumption (they steer how, not what).
RESUMABLE_CHANGES = frozenset(
    {"num-server-rounds", "output-dir", "round-timeout", "min-sites", "min-live-sites", "resume-from"}
)


@dataclass
class Checkpoint:
    """The state of a run after `round` finished rounds (round 0: the initial model was evaluated)."""

    round: int
    arrays: ArrayRecord
    strategy_state: dict[str, Any]
    rng_state: dict[str, Any]
    history: History
    site_names: dict[int, str] = field(default_factory=dict)
    weight_average: dict[str, Any] = field(default_factory=dict)  # fedseg.weight_average's state ({}: none)

    def save(self, run_dir: Path) -> Path:
        """Write `<run_dir>/checkpoint.pt` atomically (a crash leaves the previous one intact)."""
        path = run_dir / CHECKPOINT_FILE
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "format": FORMAT_VERSION,
                    "round": self.round,
                    "weights": self.arrays.to_torch_state_dict(),
                    "strategy": self.strategy_state,
                    "rng": self.rng_state,
                    "history": self.history.to_dict(),
                    "sites": dict(self.site_names),
                    "weight_average": self.weight_average,
                },
                tmp,
            )
        return path


def load_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Read `<run_dir>/checkpoint.pt`; ConfigError naming the file if it is missing or unreadable."""
    path = Path(run_dir).expanduser() / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"run-config 'resume-from': {path} not found (is '{run_dir}' a fedseg run folder?)")
    try:
        data = torch.load(path, weights_only=True)
    except Exception as err:
        raise ConfigError(f"run-config 'resume-from': cannot read {path}: {err}") from err
    if data.get("format") != FORMAT_VERSION:
        raise ConfigError(f"{path}: checkpoint format {data.get('format')!r}, this fedseg reads {FORMAT_VERSION}")
    average = data.get("weight_average", {})
    unused = isinstance(average, dict) and not average  # a run without swa-rounds
    if not unused and (problem := state_problem(average, data["weights"], int(data["round"]))):
        raise ConfigError(f"{path}: {problem}")
    return Checkpoint(
        round=int(data["round"]),
        arrays=ArrayRecord(data["weights"]),
        strategy_state=dict(data["strategy"]),
        rng_state=data["rng"],
        history=History.from_dict(data["history"]),
        site_names={int(node): str(name) for node, name in data["sites"].items()},
        weight_average=average,
    )


def check_resumable(checkpoint: Checkpoint, config: RunConfig, run_dir: str | Path) -> None:
    """Fail before any round if the run config changed what the interrupted run computes."""
    saved = checkpoint.history.config
    current = with_input_channels(config).to_dict()  # as the run recorded it: in-channels resolved
    defaults = RunConfig().to_dict()  # a key the interrupted run's fedseg did not know yet had its default
    was = {key: saved.get(key, defaults.get(key)) for key in set(saved) | set(current)}
    changed = sorted(key for key in was if key not in RESUMABLE_CHANGES and was[key] != current.get(key))
    if changed:
        details = ", ".join(f"'{k}' was {was[k]!r}, now {current.get(k)!r}" for k in changed)
        raise ConfigError(f"cannot resume {run_dir}: the run config changed: {details}")
    average = WeightAverage.last_rounds(config.swa_rounds, config.num_server_rounds)
    if average is not None and (problem := average.resume_problem(checkpoint.weight_average, checkpoint.round)):
        raise ConfigError(f"cannot resume {run_dir}: {problem}")


def rng_state() -> dict[str, Any]:
    """The server's Python, NumPy and torch random states, as checkpoint-safe values."""
    # the global RandomState is MT19937, whose legacy state is a tuple (numpy types the dict form too)
    kind, keys, pos, has_gauss, cached = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def strategy_state(strategy: object) -> dict[str, Any]:
    """`strategy.state_dict()` when the strategy has one (Flower's own strategies do not)."""
    state_dict = getattr(strategy, "state_dict", None)
    return dict(state_dict()) if callable(state_dict) else {}


def restore_strategy(strategy: object, state: dict[str, Any]) -> None:
    """Give the strategy its saved state; a stateful checkpoint needs a strategy that can load it."""
    load = getattr(strategy, "load_state_dict", None)
    if callable(load):
        load(state)
    elif state:
        raise ConfigError(f"strategy {type(strategy).__name__} cannot load the saved state (keys {sorted(state)})")


def resume_checkpoint(config: RunConfig) -> Checkpoint | None:
    """The checkpoint named by run-config 'resume-from' (checked against the config), or None."""
    if not config.resume_from:
        return None
    checkpoint = load_checkpoint(config.resume_from)
    check_resumable(checkpoint, config, config.resume_from)
    return checkpoint
