"""`fednova`: each site's update normalised by how many local steps it took (Wang et al. 2020, Tackling
the objective inconsistency problem in heterogeneous federated optimization).

A site with n subjects takes about ⌈n / batch-size⌉ steps per epoch, so under FedAvg its update is
weighted by nᵢ twice: once by its examples and once by its steps. The federation then minimises the
sites' losses weighted by nᵢ·τᵢ instead of nᵢ, favouring the large sites. FedNova averages the
updates per step and takes the mean number of steps:

    w ← g + τ_eff · Σᵢ pᵢ (wᵢ − g) / aᵢ,      pᵢ = nᵢ / Σⱼ nⱼ,   τ_eff = Σᵢ pᵢ aᵢ

aᵢ is how many gradients site i's update adds up. It comes from the reply's `local-steps` τᵢ and the
run config's optimizer: τᵢ for Adam and AdamW, whose steps each move by about the learning rate; for
SGD with Nesterov momentum ρ (fedseg's `sgd`, a fresh buffer each round)
aᵢ = [τᵢ − ρ²(1 − ρ^τᵢ)/(1 − ρ)] / (1 − ρ), the sum of what each gradient contributes by the round's
end. With equal steps everywhere it is FedAvg. With `keep-optimizer-state` the momentum buffer does
not start at zero and aᵢ is only approximate.
A reply must state a whole number of steps from 1 to what its examples allow
(⌈local-epochs⌉ · ⌈nᵢ / batch-size⌉); any other value drops it, so a site cannot buy weight by
claiming few steps. Integer buffers are averaged with the same coefficients, normalised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from flwr.app import ArrayRecord

from fedseg.config import RunConfig
from fedseg.messages import LOCAL_STEPS, NUM_EXAMPLES
from fedseg.record_values import as_float
from strategies.aggregate import weighted_sum
from strategies.base import FedSegStrategy, Reply
from strategies.fedavg import FedAvg


def gradient_count(steps: int, optimizer: str, momentum: float) -> float:
    """aᵢ: how many gradients `steps` steps of the optimizer add up (see the module docstring)."""
    if optimizer != "sgd" or momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def normalised_coefficients(examples: list[float], counts: list[float]) -> list[float]:
    """The coefficient of each site's model, pᵢ·τ_eff / aᵢ; the global model's is 1 − their sum."""
    total = sum(examples)
    shares = [n / total for n in examples]
    effective = sum(p * a for p, a in zip(shares, counts, strict=True))
    return [p * effective / a for p, a in zip(shares, counts, strict=True)]


class FedNova(FedAvg):
    """FedAvg of the sites' updates per local step, scaled by the mean number of steps."""

    name = "fednova"
    required_metrics = (NUM_EXAMPLES, LOCAL_STEPS)
    secure_aggregation_conflict = "it normalises each site's update by that site's own number of steps"

    def __init__(
        self,
        min_sites: int = 2,
        optimizer: str = "adam",
        momentum: float = 0.0,
        local_epochs: float = 1.0,
        batch_size: int = 1,
        **params: Any,
    ) -> None:
        super().__init__(min_sites=min_sites, **params)
        self.optimizer, self.momentum = optimizer, momentum
        self.passes, self.batch_size = math.ceil(local_epochs), batch_size
        self._counts: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: RunConfig, values: Mapping[str, Any]) -> FedSegStrategy:
        cls.check_config(config)
        return cls(
            min_sites=config.min_sites,
            optimizer=config.optimizer,
            momentum=config.momentum,
            local_epochs=config.local_epochs,
            batch_size=config.batch_size,
            **values,
        )

    def check_reply(self, reply: Reply) -> str:
        steps = as_float(reply.metrics[LOCAL_STEPS])
        most = self.passes * math.ceil(as_float(reply.metrics[NUM_EXAMPLES]) / self.batch_size)
        if not (steps.is_integer() and 1 <= steps <= most):
            return f"metric '{LOCAL_STEPS}' must be a whole number from 1 to {most}, got {steps:g}"
        return ""

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        counts = [gradient_count(int(as_float(r.metrics[LOCAL_STEPS])), self.optimizer, self.momentum) for r in replies]
        self._counts = {r.site: a for r, a in zip(replies, counts, strict=True)}
        coefficients = normalised_coefficients([as_float(r.metrics[NUM_EXAMPLES]) for r in replies], counts)
        return weighted_sum(
            self.global_arrays,
            [r.views for r in replies],
            coefficients,
            reference_coefficient=1.0 - sum(coefficients),
        )

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {**super().round_report(server_round), "gradient-counts": dict(self._counts)}
