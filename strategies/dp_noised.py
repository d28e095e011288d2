"""`dp-noised`: client-level differential privacy with server-side clipping (DP-FedAvg,
McMahan et al. 2018).

Each round, with Δᵢ = wᵢ − w_global over the floating-point arrays of the n good replies:

    Δᵢ ← Δᵢ · min(1, C / ‖Δᵢ‖)                  (clip each site's update to norm C)
    w_global ← w_global + (1/n) Σᵢ Δᵢ + N(0, σ²),   σ = z · C / n

C is `clipping-norm`, z `noise-multiplier`. Every site counts once (uniform weights keep one
site's influence on the average bounded by C/n, which the noise is calibrated to). Integer
buffers (BatchNorm `num_batches_tracked`) are neither noised nor taken from the sites: they keep
the global model's value, so they reveal nothing about the sites' data.

The cumulative (ε, δ) after every round comes from Flower's RDP accountant
(`flwr.serverapp.RdpAccountant`, backed by Google's dp-accounting) composing one Gaussian
release per round at δ = `target-delta`, with every connected site taking part (no sampling
amplification). It is reported in history.json (`strategy.epsilon`, `strategy.delta`) and its
state is part of `state_dict()` so a resumed run keeps counting. With z = 0 there is no
privacy: ε is reported as infinity.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)

from strategies.aggregate import weighted_sum
from strategies.base import FedSegStrategy, Reply
from strategies.params import Param


class DPNoised(FedSegStrategy):
    """Clip each site's update, average uniformly, add Gaussian noise; account (ε, δ) per round."""

    name = "dp-noised"
    params = (
        Param("clipping-norm", float, 1.0, "bound C on the L2 norm of each site's update", minimum=1e-12),
        Param("noise-multiplier", float, 1.0, "noise std z relative to C (std of the averaged noise: z·C/n)",
              minimum=0.0),
        Param("target-delta", float, 1e-5, "δ at which the cumulative ε is reported", minimum=1e-12, maximum=0.5),
    )
    clipping_norm: float
    noise_multiplier: float
    target_delta: float

    def __init__(self, min_sites: int = 2, **params: Any) -> None:
        super().__init__(min_sites, **params)
        self._accountant: RdpAccountant | None = None
        self._population = 0
        self._clipped: list[str] = []

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self._population = max(self._population, len(messages))
        return messages

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        n = len(replies)
        scales = [min(1.0, self.clipping_norm / r.update_norm) if r.update_norm > 0 else 1.0 for r in replies]
        self._clipped = [r.site for r, s in zip(replies, scales, strict=True) if s < 1.0]
        coefficients = [s / n for s in scales]
        std = self.noise_multiplier * self.clipping_norm / n
        arrays = weighted_sum(
            self.global_arrays,
            [r.views for r in replies],
            coefficients,
            reference_coefficient=1.0 - sum(coefficients),
            noise_std=std,
            rng=np.random.default_rng(),
            average_integers=False,
        )
        self._account(n)
        log(INFO, "[fedseg] dp-noised: %d/%d updates clipped to %g, noise std %.3g", len(self._clipped), n,
            self.clipping_norm, std)
        return arrays

    def _account(self, sample_size: int) -> None:
        if self.noise_multiplier <= 0:
            return
        population = max(self._population, sample_size)
        if self._accountant is None:
            self._accountant = RdpAccountant(_privacy_config(self.target_delta, population))
        event = GaussianPrivacyEvent(self.noise_multiplier, sample_size, self._accountant.config.population_size)
        self._accountant.compose(event)

    def epsilon(self) -> float:
        """Cumulative ε at `target-delta` so far (0 before any release, inf without noise)."""
        if self.noise_multiplier <= 0:
            return math.inf
        return self._accountant.get_epsilon(self.target_delta) if self._accountant else 0.0

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {
            **super().round_report(server_round),
            "epsilon": self.epsilon(),
            "delta": self.target_delta,
            "clipped-sites": list(self._clipped),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"accountant": self._accountant.state_dict() if self._accountant else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = state.get("accountant")
        if saved is None:
            self._accountant = None
            return
        population = int(saved["config"]["population_size"])
        self._accountant = RdpAccountant(_privacy_config(self.target_delta, population))
        self._accountant.load_state_dict(dict(saved))
        self._population = population


def _privacy_config(delta: float, population: int) -> PrivacyConfig:
    """Client-level accounting: every site takes part in every round, no sampling amplification."""
    return PrivacyConfig(
        target_delta=delta,
        population_size=population,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
