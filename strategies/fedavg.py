"""FedAvg: the global model is the average of site models weighted by their training examples."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedseg.config import RunConfig


class FedAvg(FlowerFedAvg):
    """Flower's FedAvg with every site sampled each round (cross-silo federation)."""

    @classmethod
    def from_config(cls, config: RunConfig) -> FedAvg:
        return cls(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=config.min_sites,
            min_evaluate_nodes=config.min_sites,
            min_available_nodes=config.min_sites,
        )
