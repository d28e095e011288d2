"""`ditto`: FedAvg for the global model, and at every site a personal model held near it (Li et al.
2021, Ditto: fair and robust federated learning through personalization).

Each round a site runs the usual local fit from the global model (its reply, averaged as FedAvg),
then trains its personal model v for the same epochs on L(v) + λ/2‖v − w_global‖² and keeps it
(clients.personal); v never leaves the site. λ → ∞ gives the global model, λ = 0 local training.
Each evaluation reports the global model's and the personal model's test Dice side by side; the
global model is the one tested on the outside institution. A site trains twice per round: Ditto
costs twice the local compute of FedAvg for the same rounds × local epochs.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedseg.messages import DITTO_LAMBDA
from strategies.fedavg import FedAvg
from strategies.params import Param


class Ditto(FedAvg):
    """FedAvg plus a personal model per site, regularised towards the global one."""

    name = "ditto"
    params = (
        Param(
            "lambda", float, 0.1, "weight λ of the personal model's pull λ/2‖v − w_global‖²", minimum=1e-6, maximum=1e6
        ),
    )
    dp_sgd_conflict = "its personal fit has a proximal term, which DP-SGD drops"
    keeps_site_models = True

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[DITTO_LAMBDA] = getattr(self, "lambda")
        return super().configure_train(server_round, arrays, config, grid)
