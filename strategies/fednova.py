"""`fednova`: each site's update normalised by how many local steps it took (Wang et al. 2020, Tackling
the objective inconsistency problem in heterogeneous federated optimization).

A site with n subjects takes ⌈n / batch-size⌉ steps per epoch, so under FedAvg its update is weighted
by n twice: once by its examples and once by its steps. The federation then minimises the sites'
losses weighted by nᵢ·τᵢ instead of nᵢ, favouring the large sites. FedNova averages the updates per
step and takes the mean number of steps:

    w ← g + τ_eff · Σᵢ pᵢ (wᵢ − g) / aᵢ,      pᵢ = nᵢ / Σⱼ nⱼ,   τ_eff = Σᵢ pᵢ aᵢ

τᵢ is not taken from the site: the server derives it from the reply's `num-examples` and the run
config (local-epochs, batch-size; fedseg.trainer.steps_per_fit), so no site can buy weight by
claiming few steps, and nothing more leaves a site than under FedAvg. aᵢ, how many gradients the
update adds up, follows from the run config's optimizer: τᵢ for Adam and AdamW, whose steps each move
by about the learning rate; for SGD with Nesterov momentum ρ (fedseg's `sgd`, a fresh buffer each
round) aᵢ = [τᵢ − ρ²(1 − ρ^τᵢ)/(1 − ρ)] / (1 − ρ), the sum of what each gradient contributes by the
round's end (with `keep-optimizer-state` the buffer does not start at zero: aᵢ is then approximate).
With equal steps everywhere it is FedAvg. The normalisation applies to the network's parameters; its
buffers (BatchNorm's running statistics, counters) are averaged as FedAvg does, since the formula's
extrapolation could turn a running variance negative.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord

from fedseg.config import RunConfig
from fedseg.model_spec import model_spec
from fedseg.record_values import as_float
from fedseg.trainer import steps_per_fit
from strategies.aggregate import weighted_sum
from strategies.base import NUM_EXAMPLES, FedSegStrategy, Reply
from strategies.fedavg import FedAvg


def gradient_count(steps: int, optimizer: str, momentum: float) -> float:
    """aᵢ: how many gradients `steps` steps of the optimizer add up (see the module docstring)."""
    if optimizer != "sgd" or momentum == 0:
        return float(steps)
    rho = momentum
    return (steps - rho * rho * (1 - rho**steps) / (1 - rho)) / (1 - rho)


def normalised_coefficients(examples: list[float], counts: list[float]) -> list[float]:
    """The coefficient of each site's parameters, pᵢ·τ_eff / aᵢ; the global model's is 1 − their sum."""
    total = sum(examples)
    shares = [n / total for n in examples]
    effective = sum(p * a for p, a in zip(shares, counts, strict=True))
    return [p * effective / a for p, a in zip(shares, counts, strict=True)]


class FedNova(FedAvg):
    """FedAvg of the sites' updates per local step, scaled by the mean number of steps."""

    name = "fednova"
    secure_aggregation_conflict = "it normalises each site's update by that site's own number of steps"

    def __init__(
        self,
        min_sites: int = 2,
        optimizer: str = "adam",
        momentum: float = 0.0,
        local_epochs: float = 1.0,
        batch_size: int = 1,
        buffer_keys: Iterable[str] = (),
        **params: Any,
    ) -> None:
        super().__init__(min_sites=min_sites, **params)
        self.optimizer, self.momentum = optimizer, momentum
        self.local_epochs, self.batch_size = local_epochs, batch_size
        self.buffer_keys = frozenset(buffer_keys)
        self._counts: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: RunConfig, values: Mapping[str, Any]) -> FedSegStrategy:
        cls.check_config(config)
        network = model_spec(config).build(1, config.labels.out_channels)
        return cls(
            min_sites=config.min_sites,
            optimizer=config.optimizer,
            momentum=config.momentum,
            local_epochs=config.local_epochs,
            batch_size=config.batch_size,
            buffer_keys=(name for name, _ in network.named_buffers()),
            **values,
        )

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        examples = [as_float(r.metrics[NUM_EXAMPLES]) for r in replies]
        counts = [
            gradient_count(steps_per_fit(n, self.local_epochs, self.batch_size), self.optimizer, self.momentum)
            for n in examples
        ]
        self._counts = {r.site: a for r, a in zip(replies, counts, strict=True)}
        coefficients = normalised_coefficients(examples, counts)
        views = [r.views for r in replies]
        parameters = ArrayRecord({k: a for k, a in self.global_arrays.items() if k not in self.buffer_keys})
        buffers = ArrayRecord({k: a for k, a in self.global_arrays.items() if k in self.buffer_keys})
        combined = weighted_sum(parameters, views, coefficients, reference_coefficient=1.0 - sum(coefficients))
        if buffers:
            combined = ArrayRecord({**combined, **weighted_sum(buffers, views, self._coefficients(replies))})
        return ArrayRecord({key: combined[key] for key in self.global_arrays})

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {**super().round_report(server_round), "gradient-counts": dict(self._counts)}
