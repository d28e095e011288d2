"""The network a run config names — preset, MONAI class, plugin or bundle — as one `ModelSpec`:
a `fedseg.models` name plus keyword arguments, and where it comes from (for model files and logs)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from fedseg.bundle import BundleError, read_bundle
from fedseg.config import ConfigError, RunConfig
from fedseg.data.sites import input_channels
from fedseg.intensity import BUNDLE, IntensityWindow, parse_intensity
from fedseg.model_args import format_model_args
from fedseg.models import ModelError, build_model, network_kind
from fedseg.network_check import check_network


@dataclass(frozen=True)
class ModelSpec:
    """A buildable network: `build_model(name, in, out, args)`."""

    name: str
    args: Mapping[str, Any] = field(default_factory=dict)
    source: str = "preset"  # "preset", "monai", "plugin <dist> <version>" or "bundle <name> <version>"

    def build(self, in_channels: int, out_channels: int) -> nn.Module:
        return build_model(self.name, in_channels, out_channels, self.args)

    def __str__(self) -> str:
        return f"{self.name}({format_model_args(self.args)})" if self.args else self.name


def model_spec(config: RunConfig) -> ModelSpec:
    """The run's network; for a bundle its network_def, checked against the run's channels (ConfigError)."""
    if config.model != "bundle":
        return ModelSpec(config.model, config.network_args, network_kind(config.model).source)
    try:
        bundle = read_bundle(config.bundle)
    except BundleError as err:
        raise ConfigError(f"run-config 'bundle': {err}") from None
    wanted = {
        "in_channels": (config.in_channels, "in-channels"),
        "out_channels": (config.labels.out_channels, "num-classes / label-scheme"),
    }
    for arg, (value, key) in wanted.items():
        found = getattr(bundle, arg)
        if found is not None and value and found != value:
            raise ConfigError(
                f"run-config 'bundle': {bundle.path.name}'s network_def has {arg}={found}, the run "
                f"{value} (run-config '{key}'); make them agree"
            )
    return ModelSpec(bundle.name, bundle.args, f"bundle {bundle.description}")


def checked_network(config: RunConfig) -> tuple[ModelSpec, int]:
    """The run's network and its parameter count, once built and run on a dummy batch of patches
    (fedseg.network_check); ConfigError naming the key before round 1 otherwise."""
    spec = model_spec(config)
    try:
        count = check_network(
            spec.name, spec.args, input_channels(config), config.labels.out_channels, config.patch_size
        )
    except ModelError as err:
        key = "bundle" if config.model == "bundle" else "model-args" if config.model_args else "model"
        raise ConfigError(f"run-config '{key}': {err}") from None
    return spec, count


def intensity_window(config: RunConfig) -> IntensityWindow | None:
    """The run's intensity window (fedseg.intensity; None: z-score); "bundle" reads the bundle's."""
    if config.intensity != BUNDLE:
        return parse_intensity(config.intensity)
    try:
        found = read_bundle(config.bundle).preprocessing
    except BundleError as err:
        raise ConfigError(f"run-config 'bundle': {err}") from None
    if found.get("intensity") == "ScaleIntensityRanged" and found.get("window") is None:
        raise ConfigError(
            "run-config 'intensity' is \"bundle\" but the bundle's ScaleIntensityRanged settings are "
            'not plain numbers: give intensity = "window:A,B,C,D"'
        )
    return found.get("window")
