"""Strategy names → classes."""

from __future__ import annotations

from flwr.serverapp.strategy import Strategy

from fedseg.config import ConfigError, RunConfig
from strategies.fedavg import FedAvg

BUILTIN = {"fedavg": FedAvg}


def build_strategy(config: RunConfig) -> Strategy:
    """Instantiate the strategy named in the run config."""
    try:
        cls = BUILTIN[config.strategy]
    except KeyError:
        raise ConfigError(
            f"run-config 'strategy' is '{config.strategy}'; choose one of: {', '.join(BUILTIN)}"
        ) from None
    return cls.from_config(config)
