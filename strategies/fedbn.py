"""`fedbn`: FedAvg over every layer but the normalisation layers, which stay at each site (Li et al.
2021, FedBN: federated learning on non-IID features via local batch normalisation).

The train instruction carries the shared layers only and `local-norm`; each site trains with its
own normalisation layers (clients.personal) and replies without them, so they never leave the site
and are never overwritten there. The global model keeps the server's normalisation layers (the
initial ones), so it is still a complete network: the one tested on the outside institution; each
site's personal model (shared layers + its own normalisation) is evaluated beside it.
A network without normalisation parameters (e.g. instance norm without affine weights) makes fedbn
plain FedAvg; every built-in preset has them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid

from fedseg.config import RunConfig
from fedseg.messages import LOCAL_NORM
from fedseg.model_spec import model_spec
from fedseg.models import norm_state_keys
from strategies.base import FedSegStrategy
from strategies.fedavg import FedAvg


class FedBN(FedAvg):
    """FedAvg of the shared layers; normalisation layers stay local at every site."""

    name = "fedbn"
    dp_sgd_conflict = "the sites' own normalisation layers would be trained outside the privacy accounting"

    def __init__(self, min_sites: int = 2, norm_keys: Iterable[str] = (), **params: Any) -> None:
        super().__init__(min_sites=min_sites, **params)
        self.norm_keys = frozenset(norm_keys)
        self._full: ArrayRecord | None = None

    @classmethod
    def from_config(cls, config: RunConfig, values: Mapping[str, Any]) -> FedSegStrategy:
        cls.check_config(config)
        keys = norm_state_keys(model_spec(config).build(1, config.labels.out_channels))
        return cls(min_sites=config.min_sites, norm_keys=keys, **values)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._full = arrays
        config[LOCAL_NORM] = True
        shared = ArrayRecord({key: array for key, array in arrays.items() if key not in self.norm_keys})
        return super().configure_train(server_round, shared, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The shared layers' average, completed with the global model's normalisation layers."""
        shared, metrics = super().aggregate_train(server_round, replies)
        if shared is None or self._full is None:
            return shared, metrics
        return ArrayRecord({key: shared.get(key, array) for key, array in self._full.items()}), metrics
