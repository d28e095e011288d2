"""`fedprox`: FedAvg aggregation; the server sends mu and each site adds (mu/2)·‖w − w_global‖²
to its training loss (Li et al. 2020). The client's trainer applies the term
(`SegmentationTrainer.fit(prox_mu=...)`); this strategy only puts `proximal-mu` in the
train config.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedseg.messages import PROXIMAL_MU
from strategies.fedavg import FedAvg
from strategies.params import Param


class FedProx(FedAvg):
    """FedAvg plus a proximal term on the sites' losses."""

    name = "fedprox"
    params = (Param("proximal-mu", float, 0.01, "weight mu of the proximal term (mu/2)·‖w − w_global‖²", minimum=0.0),)
    proximal_mu: float

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[PROXIMAL_MU] = self.proximal_mu
        return super().configure_train(server_round, arrays, config, grid)
