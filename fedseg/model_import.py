"""`fedseg import-model`: weights from elsewhere → a fedseg model file that `fedseg predict` reads.

The weights may be a state-dict file (also under "state_dict" or "model", as checkpoint handlers
save them), a run's checkpoint.pt, an old model file, or a MONAI bundle folder; a run config (TOML)
says what they are: the network (`model`, `model-args`, or `model = "bundle"` with `bundle`),
`in-channels`, `num-classes`, `label-scheme`, `patch-size` and `spacing`. Without a run config a
bundle folder is read with its own network and, where its preprocessing states them, its voxel
spacing (`Spacingd` pixdim) and patch size (crop or sliding-window roi), else fedseg's defaults.
The weights must fit the network name for name and shape (the check of run-config `init-from`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fedseg.bundle import read_bundle
from fedseg.config import RunConfig
from fedseg.data.sites import with_input_channels
from fedseg.initial_model import initial_model
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.model_spec import checked_network


def import_model(weights: str | Path, out: str | Path, config_path: str | Path | None = None) -> ModelCheckpoint:
    """Write `weights`, described by the run config at `config_path`, as a fedseg model file `out`."""
    weights = Path(weights).expanduser().resolve()
    config = RunConfig.from_toml(config_path) if config_path else RunConfig()
    if config_path is None and (weights / "configs").is_dir():
        config = dataclasses.replace(config, model="bundle", bundle=str(weights), **_bundle_grid(weights))
    config = dataclasses.replace(config, init_from=str(weights))
    config.validate()
    config = with_input_channels(config)
    checked_network(config)  # the network's size and forward pass, before any weights are built
    start = initial_model(config)
    model = ModelCheckpoint.from_config(start.state_dict, config, f"imported from {weights.name}")
    model.save(out)
    return model


def _bundle_grid(folder: Path) -> dict[str, Any]:
    """The bundle's spacing and patch size as run-config values, where it states three of each."""
    found = read_bundle(folder).preprocessing
    grid: dict[str, Any] = {}  # RunConfig fields
    pixdim, roi = found.get("pixdim"), found.get("roi_size")
    if isinstance(pixdim, list | tuple) and len(pixdim) == 3 and all(isinstance(v, int | float) for v in pixdim):
        grid["spacing"] = tuple(float(v) for v in pixdim)
    if isinstance(roi, list | tuple) and len(roi) == 3 and all(isinstance(v, int) and v > 0 for v in roi):
        grid["patch_size"] = tuple(roi)
    return grid
