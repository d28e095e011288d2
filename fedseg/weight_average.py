"""Stochastic weight averaging on the server (`swa-rounds`): the run's final model is the mean of the
global models after each of its last `swa-rounds` rounds, not the last one alone.

Averaging the iterates of the low-learning-rate end of training lands in a flatter region of the loss
than any single iterate (Izmailov et al. 2018, "Averaging weights leads to wider optima"); flat minima
are what generalises to unseen domains (Cha et al. 2021, SWAD) and to heterogeneous federated data
(Caldarola et al. 2022, server-side SWA). The sites keep training from the ordinary global model;
the average is only the run's output (model.pt). It needs no data and no communication, and it is
post-processing of models the server holds anyway, so a DP guarantee is unchanged. Floating-point
tensors are averaged, integer buffers (e.g. BatchNorm's batch counters) are taken from the last round;
BatchNorm running statistics are averaged too, not recomputed (fedseg's networks default to instance
norm, which has none). A round without a usable reply leaves the global model as it was, and that
model counts again. The running mean lives in the checkpoint, so a resumed run ends with the same
average bit for bit; the rounds it averages are those of the arm or run (a cyclic arm's rounds are
visits to one site each). Only the shared model is averaged: FedBN's site layers and Ditto's personal
models stay each site's last ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeGuard

import torch
from flwr.app import ArrayRecord


@dataclass
class WeightAverage:
    """The running mean of the global models of rounds `first_round` .. the last."""

    first_round: int
    count: int = 0
    mean: dict[str, torch.Tensor] = field(default_factory=dict)  # float64 for floating tensors

    @classmethod
    def last_rounds(cls, rounds: int, total_rounds: int) -> WeightAverage | None:
        """The average over the last `rounds` of `total_rounds` rounds; None when `rounds` is 0 (off)."""
        return cls(first_round=total_rounds - rounds + 1) if rounds > 0 else None

    def add(self, server_round: int, arrays: ArrayRecord) -> None:
        """Fold in the global model after `server_round` (ignored before the first averaged round)."""
        if server_round < self.first_round:
            return
        self.count += 1
        for key, value in arrays.to_torch_state_dict().items():
            if not value.is_floating_point():
                self.mean[key] = value.clone()
            elif key not in self.mean:
                self.mean[key] = value.double().clone()
            else:
                self.mean[key] += (value.double() - self.mean[key]) / self.count

    def arrays(self, like: ArrayRecord) -> ArrayRecord:
        """The average (at least one round folded in) in the dtypes of `like`, a global model."""
        dtypes = {key: value.dtype for key, value in like.to_torch_state_dict().items()}
        return ArrayRecord({key: self.mean[key].to(dtypes[key]) for key in dtypes})

    def describe(self, last_round: int) -> str:
        return f"mean of the global models of rounds {self.first_round}-{last_round}"

    def state_dict(self) -> dict[str, Any]:
        """A copy of the running mean, for the checkpoint (checked on load by `state_problem`)."""
        return {"first_round": self.first_round, "count": self.count, "mean": _copy(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the saved average of this run (`resume_problem` says whether it can)."""
        self.count, self.mean = int(state["count"]), _copy(state["mean"])

    def resume_problem(self, state: dict[str, Any], checkpoint_round: int) -> str | None:
        """Why this average cannot continue the one saved after `checkpoint_round`, or None: it must hold
        exactly the rounds up to there that this run config averages."""
        expected = max(0, checkpoint_round - self.first_round + 1)
        saved = int(state.get("count", 0))
        if saved == expected and (not saved or state.get("first_round") == self.first_round):
            return None
        began = f"began at round {state.get('first_round')}" if saved else "had not begun"
        return (
            f"its weight average (swa-rounds) {began} after round {checkpoint_round}; with this run config it "
            f"would begin at round {self.first_round} (keep num-server-rounds and swa-rounds as they were)"
        )


def state_problem(state: object, weights: dict[str, torch.Tensor], checkpoint_round: int) -> str | None:
    """What is wrong with a saved average's state for a model with `weights`, saved after
    `checkpoint_round`, or None. It must be the running mean of rounds first_round .. checkpoint_round
    (none yet: count 0, empty mean), in float64 for floating weights, finite."""
    if not isinstance(state, dict):
        return f"weight average is a {type(state).__name__}, not a dict"
    first, count, mean = state.get("first_round"), state.get("count"), state.get("mean")
    if not (_natural(first) and first >= 1 and _natural(count) and isinstance(mean, dict)):
        return "weight average is not {first_round ≥ 1, count ≥ 0, mean}"
    if count != (checkpoint_round - first + 1 if count else 0) or (not count and mean):
        return f"weight average counts {count} round(s) from round {first} after round {checkpoint_round}"
    for key, weight in weights.items() if count else ():
        value = mean.get(key)
        dtype = torch.float64 if weight.is_floating_point() else weight.dtype
        if not isinstance(value, torch.Tensor) or value.shape != weight.shape or value.dtype != dtype:
            return f"weight average's '{key}' is not a {dtype} tensor of shape {tuple(weight.shape)}"
        if value.is_floating_point() and not torch.isfinite(value).all():
            return f"weight average's '{key}' holds NaN or infinite values"
    if count and set(mean) != set(weights):
        return "weight average holds other weights than the model"
    return None


def _natural(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in tensors.items()}
