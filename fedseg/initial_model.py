"""The global model a new run starts from: seeded random weights, or run-config `init-from`.

`init-from` names a fedseg model file (`model.pt`, `best-model.pt`, an experiment arm's model), a
run folder (its `model.pt`), a run's `checkpoint.pt`, a MONAI bundle folder (its `models/model.pt`),
or a state-dict file (pretrained weights from elsewhere). With `model = "bundle"` and no `init-from`
the bundle's own weights are used when it has them; `init-from = "random"` starts from seeded random
weights either way. The weights must fit the run's network name for name and shape (ConfigError
naming the file and the first misfit, before round 1). history.json keeps `init-from` with the run
config; the server logs the file's SHA-256.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedseg.bundle import BundleError, bundle_weights, read_bundle
from fedseg.config import ConfigError, RunConfig
from fedseg.data.sites import input_channels
from fedseg.model_checkpoint import CheckpointError, read_state_dict, weights_fault
from fedseg.model_spec import model_spec
from fedseg.privacy import make_dp_compatible

RANDOM = "random"


@dataclass(frozen=True)
class InitialModel:
    """The initial global weights and where they come from."""

    state_dict: dict[str, torch.Tensor]
    source: str  # "random (seed 0)", or the file the weights were read from
    sha256: str = ""  # of that file

    def __str__(self) -> str:
        return f"{self.source} (sha256 {self.sha256[:16]})" if self.sha256 else self.source


def initial_model(config: RunConfig) -> InitialModel:
    """Seeded random weights (the same on every run with the same seed), or those `init-from` names."""
    torch.manual_seed(config.seed)
    model = model_spec(config).build(input_channels(config), config.labels.out_channels)
    path = _weights_path(config)
    if path is None:
        return InitialModel(_prepared(model, config).state_dict(), f"random (seed {config.seed})")
    state = _read_weights(path)
    fault = weights_fault(model.state_dict(), state)
    if fault:
        raise ConfigError(
            f"run-config 'init-from': {path}: the weights do not fit the run's network ({model_spec(config)}): {fault}"
        )
    model.load_state_dict(state, strict=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return InitialModel(_prepared(model, config).state_dict(), str(path), digest)


def _prepared(model: nn.Module, config: RunConfig) -> nn.Module:
    return make_dp_compatible(model) if config.dp_sgd else model


def _weights_path(config: RunConfig) -> Path | None:
    """The weights file to start from, or None for random weights."""
    if config.init_from == RANDOM:
        return None
    if not config.init_from:
        if config.model == "bundle":
            return read_bundle(config.bundle).weights_file
        return None
    path = Path(config.init_from).expanduser().resolve()
    if path.is_dir():
        if (path / "configs").is_dir():
            bundle_file = read_bundle(path).weights_file
            if bundle_file is None:
                raise ConfigError(f"run-config 'init-from': {path} is a bundle without models/model.pt")
            return bundle_file
        for name in ("model.pt", "checkpoint.pt"):
            if (path / name).is_file():
                return path / name
        raise ConfigError(f"run-config 'init-from': {path} holds no model.pt, checkpoint.pt or bundle configs/")
    if not path.is_file():
        raise ConfigError(f"run-config 'init-from': {path} not found")
    return path


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.parent.name == "models" and (path.parent.parent / "configs").is_dir():
            return bundle_weights(read_bundle(path.parent.parent))
        return read_state_dict(path)
    except (BundleError, CheckpointError) as err:
        raise ConfigError(f"run-config 'init-from': {err}") from None
