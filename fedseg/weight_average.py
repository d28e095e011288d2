"""Stochastic weight averaging on the server (`swa-rounds`): the run's final model is the mean of the
global models after each of its last `swa-rounds` rounds, not the last one alone.

Averaging the iterates of the low-learning-rate end of training lands in a flatter region of the loss
than any single iterate (Izmailov et al. 2018, "Averaging weights leads to wider optima"); flat minima
are what generalises to unseen domains (Cha et al. 2021, SWAD) and to heterogeneous federated data
(Caldarola et al. 2022, server-side SWA). The sites keep training from the ordinary global model;
the average is only the run's output (model.pt). It needs no data and no communication, and it is
post-processing of models the server holds anyway, so a DP guarantee is unchanged. Floating-point
tensors are averaged, integer buffers (e.g. BatchNorm's batch counters) are taken from the last round.
The running mean lives in the checkpoint, so a resumed run ends with the same average bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
        """The average in the dtypes of `like` (a global model); `like` itself before any round was averaged."""
        if not self.count:
            return like
        dtypes = {key: value.dtype for key, value in like.to_torch_state_dict().items()}
        return ArrayRecord({key: self.mean[key].to(dtypes[key]) for key in dtypes})

    def describe(self, last_round: int) -> str:
        return f"mean of the global models of rounds {self.first_round}-{last_round} (swa-rounds {self.count})"

    def state_dict(self) -> dict[str, Any]:
        return {"first_round": self.first_round, "count": self.count, "mean": dict(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` of the same run (checked by `state_problem` and `resume_problem`)."""
        self.count, self.mean = int(state["count"]), dict(state["mean"])

    def resume_problem(self, state: dict[str, Any]) -> str | None:
        """Why this average cannot continue the saved one (it began at another round), or None."""
        if state.get("count") and state.get("first_round") != self.first_round:
            return (
                f"its weight average (swa-rounds) began at round {state.get('first_round')}; with this run "
                f"config it would begin at round {self.first_round} (keep num-server-rounds as it was)"
            )
        return None


def state_problem(state: dict[str, Any], weights: dict[str, torch.Tensor]) -> str | None:
    """What is wrong with a saved average's state for a model with `weights`, or None."""
    first, count, mean = state.get("first_round"), state.get("count"), state.get("mean")
    if not (isinstance(first, int) and first >= 1 and isinstance(count, int) and count >= 0 and isinstance(mean, dict)):
        return "weight average is not {first_round ≥ 1, count ≥ 0, mean}"
    if count and (
        set(mean) != set(weights)
        or any(not isinstance(mean[k], torch.Tensor) or mean[k].shape != weights[k].shape for k in weights)
    ):
        return "weight average does not hold one tensor of the model's shape per weight"
    return None
