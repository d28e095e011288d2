"""A trained model as one file: weights plus what is needed to rebuild and apply the network.

Format (a `torch.save`d dict, loaded with `weights_only=True`):
`{"format": "fedseg-model/1", "state_dict": {name: tensor}, "model": "unet", "in_channels": 1,
"num_classes": 3, "patch_size": [32, 32, 32], "pixdim": [1.0, 1.0, 1.0] or None, "label_scheme": "classes",
"region_training": false, "description": "..."}`.
`pixdim` is the voxel spacing (mm) the model was trained at (None: the stored grid, no resampling);
`label_scheme` and `region_training` say what the outputs mean (fedseg.labels; absent: classes).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedseg.atomic import atomic_path
from fedseg.config import RunConfig
from fedseg.errors import first_line
from fedseg.labels import SCHEMES, LabelScheme
from fedseg.limits import MAX_CHANNELS, MAX_NUM_CLASSES
from fedseg.models import MODEL_NAMES, build_model
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
        """Read and check a model file: its fields, and that its weights fit the network they name
        (CheckpointError naming the file and the fault otherwise)."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch.load parses untrusted bytes; any failure means unreadable
            raise CheckpointError(f"{path}: cannot read model file: {type(err).__name__}: {first_line(err)}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a fedseg model file (expected format '{FORMAT}')")
        try:
            checkpoint = cls(**_checked_fields(data))
            checkpoint.labels  # noqa: B018 - the label scheme checks itself (e.g. brats has 4 classes)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: not a usable fedseg model file: {first_line(err)}") from None
        fault = checkpoint.weights_fault()
        if fault:
            raise CheckpointError(f"{path}: weights do not fit model '{checkpoint.model}' with "
                                  f"{checkpoint.in_channels} input channel(s), {checkpoint.num_classes} classes: {fault}")
        return checkpoint

    def weights_fault(self) -> str | None:
        """What in `state_dict` differs from the named network's parameters (names, shapes), else None."""
        expected = build_model(self.model, self.in_channels, self.labels.out_channels).state_dict()
        missing = sorted(set(expected) - set(self.state_dict))
        extra = sorted(set(self.state_dict) - set(expected))
        if missing or extra:
            return f"{len(missing)} missing and {len(extra)} unexpected weight(s), e.g. {(missing + extra)[:2]}"
        for key, tensor in expected.items():
            found = self.state_dict[key]
            if tuple(found.shape) != tuple(tensor.shape):
                return f"'{key}' has shape {tuple(found.shape)}, the network's is {tuple(tensor.shape)}"
            if tensor.is_floating_point() and not found.is_floating_point():
                return f"'{key}' holds {found.dtype}, not floating-point numbers"
            if found.is_floating_point() and not bool(torch.isfinite(found).all()):
                return f"'{key}' holds NaN or infinite values"
        return None

    def trainer(self, device: str | torch.device | None = None) -> SegmentationTrainer:
        """A SegmentationTrainer holding these weights (for sliding-window inference)."""
        trainer = SegmentationTrainer(
            self.model, self.num_classes, self.patch_size, in_channels=self.in_channels, device=device,
            labels=self.labels,
        )
        trainer.set_weights(self.state_dict)
        return trainer


def _checked_fields(data: Mapping) -> dict:
    """The dataclass fields of a loaded model file; TypeError/ValueError naming the first bad one."""
    weights = data["state_dict"]
    if not isinstance(weights, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                   for k, v in weights.items()):
        raise TypeError("'state_dict' must map names to tensors")
    model = data["model"]
    if model not in MODEL_NAMES:
        raise ValueError(f"'model' is {model!r}; known: {', '.join(MODEL_NAMES)}")
    pixdim = data["pixdim"]
    fields = {
        "state_dict": weights,
        "model": model,
        "num_classes": _whole(data, "num_classes", 2, MAX_NUM_CLASSES),
        "patch_size": _triple(data["patch_size"], int, "patch_size"),
        "pixdim": _triple(pixdim, float, "pixdim") if pixdim is not None else None,
        "in_channels": _whole(data, "in_channels", 1, MAX_CHANNELS),
        "description": str(data.get("description", "")),
        "label_scheme": data.get("label_scheme", "classes"),
        "region_training": data.get("region_training", False),
    }
    if fields["label_scheme"] not in SCHEMES or not isinstance(fields["region_training"], bool):
        raise ValueError(f"'label_scheme' {fields['label_scheme']!r} / 'region_training' "
                         f"{fields['region_training']!r}: label scheme one of {', '.join(SCHEMES)}, and true or false")
    if not all(8 <= p <= 512 for p in fields["patch_size"]):
        raise ValueError(f"'patch_size' {fields['patch_size']} must be 8 to 512 per axis")
    if fields["pixdim"] is not None and not all(0 < p < math.inf for p in fields["pixdim"]):
        raise ValueError(f"'pixdim' {fields['pixdim']} must be finite and > 0")
    return fields


def _whole(data: Mapping, key: str, low: int, high: int) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"'{key}' must be a whole number from {low} to {high}, got {value!r}")
    return value


def _triple(values: Sequence, kind: type, key: str = "value") -> tuple:
    if not isinstance(values, (list, tuple)) or len(values) != 3 or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values
    ):
        raise ValueError(f"'{key}' must be a list of 3 numbers, got {values!r}")
    return tuple(kind(v) for v in values)

