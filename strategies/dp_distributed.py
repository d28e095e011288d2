"""`dp-distributed`: client-level differential privacy under secure aggregation (distributed DP).

`dp-noised` clips each update and adds the noise at the server, so the server must see every
update. Here the sites do both, before masking (fedseg.secagg.site): with m sites sampled in the
round (every live site), each site i sends

    clip(Δᵢ, C) + N(0, (z·C)² / m)          (weight 1: every site counts once, as in dp-noised)

and the server unmasks only the sum of the k sites that got through and divides by k:

    w_global ← w_global + (Σᵢ clip(Δᵢ, C) + N(0, (z·C)²·k/m)) / k

With k = m this is dp-noised's release (noise multiplier z on the sum, sensitivity C). When sites
drop out mid-round (k < m) their noise shares are missing: the round is accounted honestly with
noise multiplier z·√(k/m). ε composes like dp-noised's (strategies.client_privacy: RDP, every
connected site each round, add-or-remove-one neighbours) and is reported in history.json
(`strategy.epsilon`). Integer buffers keep the global model's value.

Limits (docs/secure-aggregation.md): against the server colluding with c sites, which know their
own noise, the effective multiplier is z·√((m − c)/m); the Gaussian noise is rounded to the ring's
2⁻³² grid after it is drawn, which the accounting ignores (a rigorous version draws discrete
Gaussian noise in the ring).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from fedseg import messages as m
from fedseg.config import ConfigError, RunConfig
from fedseg.noise import NOISE_SOURCES
from fedseg.record_values import as_int
from strategies.client_privacy import (
    TARGET_DELTA,
    Release,
    epsilon_of,
    releases_from_state,
    releases_to_state,
)
from strategies.fedavg import FedAvg
from strategies.params import Param


class DPDistributed(FedAvg):
    """Sites clip their update and add their share of the noise before masking; (ε, δ) per round."""

    name = "dp-distributed"
    secure_aggregation_conflict = ""  # it needs secure aggregation
    params = (
        Param("clipping-norm", float, 1.0, "bound C on the L2 norm of each site's update", minimum=1e-12),
        Param(
            "noise-multiplier", float, 1.0, "noise std z relative to C of the sum (each site adds z·C/√m)", minimum=0.0
        ),
        TARGET_DELTA,
        Param(
            "noise-source",
            str,
            "secure",
            "the sites' Gaussian noise: numpy's PCG64 or a ChaCha20 CSPRNG (fedseg/noise.py)",
            choices=NOISE_SOURCES,
        ),
    )
    clipping_norm: float
    noise_multiplier: float
    target_delta: float
    noise_source: str

    def __init__(self, min_sites: int = 2, **params: Any) -> None:
        super().__init__(min_sites, **params)
        self._releases: list[Release] = []
        self._sampled = 0
        self._summed = 0

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        super().check_config(config)
        if not config.secure_aggregation:
            raise ConfigError(
                "strategy 'dp-distributed' needs run-config 'secure-aggregation = true' (the sites add "
                "the noise to masked updates); without secure aggregation use 'dp-noised'"
            )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._sampled = len(list(grid.get_node_ids()))  # fraction-train 1: every live site
        config[m.DP_CLIP] = self.clipping_norm
        config[m.DP_SITE_NOISE_STD] = self.noise_multiplier * self.clipping_norm / math.sqrt(max(self._sampled, 1))
        config[m.DP_SITE_NOISE_SOURCE] = self.noise_source
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The unmasked aggregate, then one release accounted with the noise the summed sites added."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        self._summed = as_int(metrics.get(m.SECAGG_SUMMED, 0)) if arrays is not None and metrics is not None else 0
        if self._summed and self.noise_multiplier > 0:
            effective = self.noise_multiplier * math.sqrt(self._summed / self._sampled)
            self._releases.append(Release(effective, "all", self._sampled, self._sampled))
            log(
                INFO,
                "[fedseg] dp-distributed: %d of %d sites' noise in the sum (noise multiplier %.3g); ε %.3g",
                self._summed,
                self._sampled,
                effective,
                self.epsilon(),
            )
        return arrays, metrics

    def epsilon(self) -> float:
        """Cumulative ε at `target-delta` so far (0 before any release, inf without noise)."""
        if self.noise_multiplier <= 0:
            return math.inf
        return epsilon_of(self._releases, self.target_delta)

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {
            **super().round_report(server_round),
            "epsilon": self.epsilon(),
            "delta": self.target_delta,
            "sampled-sites": self._sampled,
            "summed-sites": self._summed,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"releases": releases_to_state(self._releases)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._releases = releases_from_state(state.get("releases", []))
