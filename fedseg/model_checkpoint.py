"""A trained model as one file: weights plus what is needed to rebuild and apply the network.

Format (a `torch.save`d dict, loaded with `weights_only=True`):
`{"format": "fedseg-model/1", "state_dict": {name: tensor}, "model": "unet", "in_channels": 1,
"num_classes": 3, "patch_size": [32, 32, 32], "pixdim": [1.0, 1.0, 1.0] or None, "label_scheme": "classes",
"region_training": false, "description": "..."}`.
`pixdim` is the voxel spacing (mm) the model was trained at (None: the stored grid, no resampling);
`label_scheme` and `region_training` say what the outputs mean (fedseg.labels; absent: classes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedseg.atomic import atomic_path
from fedseg.config import RunConfig
from fedseg.labels import LabelScheme
from fedseg.trainer import SegmentationTrainer

FORMAT = "fedseg-model/1"


class CheckpointError(ValueError):
    """A model file cannot be read; the message names the file and the problem."""


@dataclass(frozen=True)
class ModelCheckpoint:
    """Weights of one network and how to rebuild it."""

    state_dict: Mapping[str, torch.Tensor]
    model: str
    num_classes: int
    patch_size: tuple[int, int, int]
    pixdim: tuple[float, float, float] | None = None
    in_channels: int = 1
    description: str = ""
    label_scheme: str = "classes"
    region_training: bool = False

    @property
    def labels(self) -> LabelScheme:
        """What the network's outputs mean."""
        return LabelScheme(self.label_scheme, self.num_classes, self.region_training)

    @classmethod
    def from_config(cls, state_dict: Mapping[str, torch.Tensor], config: RunConfig, description: str) -> ModelCheckpoint:
        """The weights of a run with `config` (its in-channels resolved) and how to apply them."""
        return cls(
            state_dict=state_dict,
            model=config.model,
            num_classes=config.num_classes,
            patch_size=config.patch_size,
            pixdim=config.spacing,  # the grid the sites trained at (None: each scan's stored grid)
            in_channels=config.in_channels or 1,
            description=description,
            label_scheme=config.label_scheme,
            region_training=config.region_training,
        )

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file beside `path`, then a rename)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "format": FORMAT,
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
                    "model": self.model,
                    "in_channels": self.in_channels,
                    "num_classes": self.num_classes,
                    "patch_size": list(self.patch_size),
                    "pixdim": list(self.pixdim) if self.pixdim is not None else None,
                    "description": self.description,
                    "label_scheme": self.label_scheme,
                    "region_training": self.region_training,
                },
                tmp,
            )

    @classmethod
    def load(cls, path: str | Path) -> ModelCheckpoint:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError, EOFError) as err:
            raise CheckpointError(f"{path}: cannot read model file: {err}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a fedseg model file (expected format '{FORMAT}')")
        pixdim = data["pixdim"]
        return cls(
            state_dict=data["state_dict"],
            model=data["model"],
            num_classes=int(data["num_classes"]),
            patch_size=_triple(data["patch_size"], int),
            pixdim=_triple(pixdim, float) if pixdim is not None else None,
            in_channels=int(data["in_channels"]),
            description=str(data.get("description", "")),
            label_scheme=str(data.get("label_scheme", "classes")),
            region_training=bool(data.get("region_training", False)),
        )

    def trainer(self, device: str | torch.device | None = None) -> SegmentationTrainer:
        """A SegmentationTrainer holding these weights (for sliding-window inference)."""
        trainer = SegmentationTrainer(
            self.model, self.num_classes, self.patch_size, in_channels=self.in_channels, device=device,
            labels=self.labels,
        )
        trainer.set_weights(self.state_dict)
        return trainer


def _triple(values: Sequence, kind: type) -> tuple:
    return tuple(kind(v) for v in values)
