"""`fedper`: FedAvg, and every site keeps its own output stage (Arivazhagan et al. 2019, Federated
learning with personalization layers).

The output stage is the trailing convolutions that produce the class channels (fedseg.models
.head_state_keys: for the `unet` preset the last up-convolution and its residual unit). Each round a
site starts from the global model with its own output stage (the global one in its first round),
trains both and keeps its output stage (clients.personal): a per-site head can follow that site's
annotation convention (a boundary drawn looser or tighter) while the rest is learned by everyone.
Unlike the paper's, the site still sends its output stage, so the global model (shared layers + the
mean of the sites' output stages) is complete: it is the one tested on the outside institution, each
site's personal model (shared layers + its own output stage) on its own cases. The server's
arithmetic is FedAvg's, so it also runs under secure aggregation and with DP-SGD.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedseg.config import ConfigError, RunConfig
from fedseg.messages import LOCAL_HEAD
from fedseg.model_spec import model_spec
from fedseg.models import head_state_keys
from strategies.base import FedSegStrategy
from strategies.fedavg import FedAvg


class FedPer(FedAvg):
    """FedAvg; each site trains and keeps its own output stage (its personal model's head)."""

    name = "fedper"

    @classmethod
    def from_config(cls, config: RunConfig, values: Mapping[str, Any]) -> FedSegStrategy:
        """Refuse, before round 1, a network without an output stage to keep."""
        out_channels = config.labels.out_channels
        try:
            head_state_keys(model_spec(config).build(1, out_channels), out_channels)
        except ValueError as err:
            raise ConfigError(f"strategy 'fedper' cannot run with model '{config.model}': {err}") from None
        return super().from_config(config, values)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config[LOCAL_HEAD] = True
        return super().configure_train(server_round, arrays, config, grid)
