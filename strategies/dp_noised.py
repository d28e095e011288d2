"""`dp-noised`: client-level differential privacy with server-side clipping (DP-FedAvg,
McMahan et al. 2018), site sampling and adaptive clipping (Andrew et al. 2021).

Each round, the sites of the cohort (strategies/client_privacy.py: every site, Poisson or
fixed-size sampling) train; with Δᵢ = wᵢ − w_global over the floating-point arrays of the good
replies:

    Δᵢ ← Δᵢ · min(1, C / ‖Δᵢ‖)                    (clip each site's update to norm C)
    w_global ← w_global + (Σᵢ Δᵢ + N(0, (z_Δ·C)²)) / m

m is the number of replies (`sampling = "all"`) or `cohort-size` (sampled cohorts: a public
denominator, so a site that was drawn but failed costs no privacy). C is `clipping-norm`, or,
with `target-quantile` > 0, a bound that follows that quantile of the update norms from round
to round (its noised count shares the privacy budget: z_Δ is slightly above `noise-multiplier`).
Every site counts once. Integer buffers (BatchNorm `num_batches_tracked`) are neither noised nor
taken from the sites. A sampled round whose cohort is empty, or whose replies all failed,
still releases the noised global model (the mechanism the accountant counts).

The noise comes from `noise-source`: numpy's PCG64 or a ChaCha20 CSPRNG (fedseg/noise.py).
The cumulative (ε, δ) after every round is composed by Google's dp-accounting RDP accountant
(the library behind Flower's `RdpAccountant`) from one event per round, each with that round's
population of connected sites, so a site may join or leave mid-run. It is reported in
history.json (`strategy.epsilon`, `strategy.delta`, with the round's `cohort` and
`clipping-norm`) and kept in `state_dict()` so a resumed run keeps counting. With z = 0 there is
no privacy: no ε is reported (the run counts as trained without DP; `epsilon()` is infinity).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedseg.config import ConfigError
from fedseg.noise import NOISE_SOURCES, GaussianSource, gaussian_source
from strategies.aggregate import weighted_sum
from strategies.base import FedSegStrategy, Reply
from strategies.client_privacy import (
    SAMPLINGS,
    TARGET_DELTA,
    QuantileClip,
    Release,
    default_count_stddev,
    draw_cohort,
    epsilon_of,
    releases_from_flower_state,
    releases_from_state,
    releases_to_state,
    update_noise_multiplier,
)
from strategies.params import Param


class DPNoised(FedSegStrategy):
    """Sample a cohort, clip each update, sum, add Gaussian noise, divide by m; account (ε, δ) per round."""

    name = "dp-noised"
    params = (
        Param(
            "clipping-norm",
            float,
            1.0,
            "bound C on the L2 norm of each site's update (adaptive: its start)",
            minimum=1e-12,
        ),
        Param(
            "noise-multiplier", float, 1.0, "noise std z relative to C (std of the averaged noise: z·C/m)", minimum=0.0
        ),
        TARGET_DELTA,
        Param(
            "sampling",
            str,
            "all",
            "sites per round: all, poisson (each with rate cohort-size / sites) or "
            "fixed (cohort-size drawn without replacement)",
            choices=SAMPLINGS,
        ),
        Param(
            "cohort-size",
            int,
            0,
            "expected (poisson) or exact (fixed) sites per round, the average's denominator",
            minimum=0,
        ),
        Param(
            "target-quantile",
            float,
            0.0,
            "adaptive clipping: the quantile of update norms C follows (0: fixed C)",
            minimum=0.0,
            maximum=0.99,
        ),
        Param("clip-learning-rate", float, 0.2, "adaptive clipping: geometric step η of C per round", minimum=0.0),
        Param(
            "clip-count-stddev",
            float,
            0.0,
            "adaptive clipping: noise σ_b of the clipped count (0: max(cohort / 20, noise-multiplier))",
            minimum=0.0,
        ),
        Param(
            "noise-source",
            str,
            "numpy",
            "Gaussian noise and sampling from numpy's PCG64 or a ChaCha20 CSPRNG (secure)",
            choices=NOISE_SOURCES,
        ),
    )
    clipping_norm: float
    noise_multiplier: float
    target_delta: float
    sampling: str
    cohort_size: int
    target_quantile: float
    clip_learning_rate: float
    clip_count_stddev: float
    noise_source: str

    def __init__(self, min_sites: int = 2, **params: Any) -> None:
        super().__init__(min_sites, **params)
        if self.sampling != "all" and self.cohort_size < 1:
            raise ConfigError(f"dp-noised.sampling '{self.sampling}' needs dp-noised.cohort-size >= 1")
        if self.target_quantile > 0 and self.clip_count_stddev > 0 and self.noise_multiplier > 0:
            try:
                update_noise_multiplier(self.noise_multiplier, self.clip_count_stddev)
            except ValueError as err:
                raise ConfigError(f"dp-noised: {err}") from err
        self._source: GaussianSource = gaussian_source(self.noise_source)
        self._clip = QuantileClip(self.target_quantile, self.clip_learning_rate) if self.target_quantile > 0 else None
        self._bound = self.clipping_norm
        self._releases: list[Release] = []
        self._population = 0
        self._cohort: list[int] = []
        self._clipped: list[str] = []
        self._round_bound = self.clipping_norm

    # ------------------------------------------------------------------ who trains
    def train_instructions(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.sampling == "all":
            messages = list(super().train_instructions(server_round, arrays, config, grid))
            self._population = len(messages)
            self._cohort = [m.metadata.dst_node_id for m in messages]
            return messages
        nodes = sorted(grid.get_node_ids())
        self._population = len(nodes)
        self._cohort = draw_cohort(nodes, self.sampling, self.cohort_size, self._source)
        log(
            INFO,
            "[fedseg] dp-noised: round %d cohort of %d of %d sites (%s sampling)",
            server_round,
            len(self._cohort),
            len(nodes),
            self.sampling,
        )
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self._construct_messages(record, self._cohort, MessageType.TRAIN)

    # ------------------------------------------------------------------ the private release
    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        arrays, metrics = super().aggregate_train(server_round, replies)
        if arrays is None and self.sampling != "all" and self.noise_multiplier > 0 and self._population:
            arrays = self.combine(server_round, [])  # empty cohort or no good reply: noise still released
        return arrays, metrics

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        bound = self._round_bound = self._bound
        m = len(replies) if self.sampling == "all" else self.cohort_size
        count_stddev = self._count_stddev(m)
        z_update = update_noise_multiplier(self.noise_multiplier, count_stddev) if self.noise_multiplier > 0 else 0.0
        norms = [r.update_norm for r in replies]
        scales = [min(1.0, bound / norm) if norm > 0 else 1.0 for norm in norms]
        self._clipped = [r.site for r, s in zip(replies, scales, strict=True) if s < 1.0]
        coefficients = [s / m for s in scales]
        std = z_update * bound / m
        arrays = weighted_sum(
            self.global_arrays,
            [r.views for r in replies],
            coefficients,
            reference_coefficient=1.0 - sum(coefficients),
            noise_std=std,
            rng=self._source,
            average_integers=False,
        )
        if self._clip is not None:
            fraction = self._clip.noised_fraction(norms, bound, m, count_stddev, self._source)
            self._bound = self._clip.next_bound(bound, fraction)
        self._account(m)
        log(
            INFO,
            "[fedseg] dp-noised: %d/%d updates clipped to %.4g, noise std %.3g",
            len(self._clipped),
            len(replies),
            bound,
            std,
        )
        return arrays

    def _count_stddev(self, cohort: int) -> float:
        if self._clip is None or self.noise_multiplier <= 0:
            return 0.0
        return self.clip_count_stddev or default_count_stddev(cohort, self.noise_multiplier)

    def _account(self, cohort: int) -> None:
        if self.noise_multiplier <= 0:
            return
        population = max(self._population, cohort) if self.sampling == "all" else self._population
        self._releases.append(Release(self.noise_multiplier, self.sampling, population, cohort))

    def epsilon(self) -> float:
        """Cumulative ε at `target-delta` so far (0 before any release, inf without noise)."""
        if self.noise_multiplier <= 0:
            return math.inf
        return epsilon_of(self._releases, self.target_delta)

    def round_report(self, server_round: int) -> dict[str, Any]:
        privacy = {"epsilon": self.epsilon(), "delta": self.target_delta} if self.noise_multiplier > 0 else {}
        return {
            **super().round_report(server_round),
            **privacy,  # none without noise: the run is not private (an experiment's non-DP reference)
            "clipped-sites": list(self._clipped),
            "clipping-norm": self._round_bound,
            "cohort": len(self._cohort),
            "population": self._population,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"releases": releases_to_state(self._releases), "clipping-norm": self._bound}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "accountant" in state:  # a checkpoint of the Flower-accountant dp-noised
            saved = state["accountant"]
            self._releases = releases_from_flower_state(saved) if saved else []
            return
        self._releases = releases_from_state(state.get("releases", []))
        self._bound = float(state.get("clipping-norm", self.clipping_norm))
