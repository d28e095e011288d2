"""`fedprox`: FedAvg aggregation; the server sends mu and each site adds (mu/2)·‖w − w_global‖²
to its training loss (Li et al. 2020). The client's trainer applies the term
(`SegmentationTrainer.fit(prox_mu=...)`); the strategy only puts `proximal-mu` in the train config.

`ProximalTerm` is that part alone, for composing with another aggregation rule
(`dice-weighted.proximal-mu`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedseg.config import ConfigError, RunConfig
from fedseg.messages import PROXIMAL_MU
from strategies.base import FedSegStrategy
from strategies.fedavg import FedAvg
from strategies.params import Param


def proximal_param(default: float) -> Param:
    """The `proximal-mu` parameter with the given default."""
    return Param("proximal-mu", float, default, "weight mu of the proximal term (mu/2)·‖w − w_global‖²", minimum=0.0)


def refuse_with_dp_sgd(config: RunConfig, strategy: str, mu: float) -> None:
    """ConfigError if the sites would add a proximal term (mu > 0) while DP-SGD trains them."""
    if config.dp_sgd and mu > 0:
        raise ConfigError(
            f"run-config '{strategy}.proximal-mu' is {mu:g} but 'dp-sgd' is on: Opacus replaces the gradient by "
            "the clipped, noised per-subject sum, which drops the proximal term (set it to 0)"
        )


class ProximalTerm(FedSegStrategy):
    """Base of the strategies whose sites add the proximal term (FedProx, dice-weighted): each
    round's train config carries `proximal-mu`; refused with DP-SGD when mu > 0."""

    params = (proximal_param(0.0),)
    proximal_mu: float

    @classmethod
    def from_config(cls, config: RunConfig, values: Mapping[str, Any]) -> FedSegStrategy:
        strategy = cast(ProximalTerm, super().from_config(config, values))
        refuse_with_dp_sgd(config, cls.strategy_name(), strategy.proximal_mu)
        return strategy

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[PROXIMAL_MU] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)


class FedProx(ProximalTerm, FedAvg):
    """FedAvg plus a proximal term on the sites' losses."""

    name = "fedprox"
    params = (proximal_param(0.01),)
