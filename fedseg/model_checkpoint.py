"""A trained model as one file: weights plus what is needed to rebuild and apply the network.

Every model fedseg writes is in this format (a run's model.pt and best-model.pt, experiment arms'
models, `fedseg import-model`); `fedseg predict` also reads a run's checkpoint.pt and a run folder.
Format (a `torch.save`d dict of tensors and plain values, loaded with `weights_only=True`):
`{"format": "fedseg-model/2" (/3 with a post-processing threshold, /4 with an `ensemble_weight`),
"state_dict": {name: tensor}, "model": "SegResNet",
"model_args": {"init_filters": 16}, "model_source": "monai", "in_channels": 1, "num_classes": 3,
"patch_size": [32, 32, 32], "pixdim": [1.0, 1.0, 1.0] or None, "label_scheme": "classes",
"region_training": false, "enhancing_min_voxels": 0, "personal_weight": None, "ensemble_weight": None,
"intensity": None or [a_min, a_max, b_min, b_max, clip], "preprocessing": {...},
"init_from": "", "dp_compatible": false,
"fedseg_version": "0.1.0", "description": "..."}`.
`model` and `model_args` rebuild the network (fedseg.models: a preset, a class of
monai.networks.nets or a `fedseg.models` plugin; `model_source` says which, with the plugin's or
bundle's name and version); `pixdim` is the voxel spacing (mm) the model was trained at (None: the
stored grid, no resampling); `label_scheme` and `region_training` say what the outputs mean
(fedseg.labels), `enhancing_min_voxels` the BraTS enhancing-tumour post-processing threshold
(fedseg.enhancing; 0: none, also when absent); `personal_weight` (a global model) and `ensemble_weight` (a
site's exported personal model) the personal model's weight in their mean, per output channel or one for all
(fedseg.personal_mix; None, or absent: equal weights); `intensity` the intensity window (fedseg.intensity;
None: z-score);
`preprocessing` describes the steps `fedseg predict` applies (PREPROCESSING, in words);
`dp_compatible`: trained with DP-SGD, the network's BatchNorm layers rebuilt as GroupNorm.
Format 1 files (no model_args) are read as presets with their own arguments.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeGuard

import torch

import fedseg
from fedseg.atomic import atomic_path
from fedseg.config import STRATEGY_PARAM_SEPARATOR, ConfigError, RunConfig
from fedseg.enhancing import choose_min_voxels
from fedseg.errors import first_line
from fedseg.intensity import IntensityError, IntensityWindow, describe, is_finite
from fedseg.labels import SCHEMES, LabelScheme
from fedseg.limits import MAX_CHANNELS, MAX_NUM_CLASSES, MAX_SPACING_MM
from fedseg.model_args import format_model_args
from fedseg.model_spec import intensity_window, model_spec
from fedseg.models import ModelError, network_kind, network_shapes
from fedseg.personal_mix import Weights, check_weight, choose_personal_weight
from fedseg.privacy import make_dp_compatible
from fedseg.trainer import SW_BATCH_SIZE, SegmentationTrainer

FORMAT = "fedseg-model/2"
# a model with enhancing-tumour post-processing: /2 plus `enhancing_min_voxels`, so that a fedseg that
# cannot apply it refuses the file ("upgrade fedseg") instead of segmenting without it
POSTPROCESSED_FORMAT = "fedseg-model/3"
# a site's personal model with its weight in the mean with the global model (fedseg.personal_mix), so that a
# fedseg that would average it equally refuses it; a global model's `personal_weight` changes nothing alone
WEIGHTED_FORMAT = "fedseg-model/4"
READABLE_FORMATS = ("fedseg-model/1", FORMAT, POSTPROCESSED_FORMAT, WEIGHTED_FORMAT)
RUN_MODEL, RUN_CHECKPOINT = "model.pt", "checkpoint.pt"  # in a run folder (fedseg.federation, fedseg.checkpoint)
# What `fedseg predict` does to an image before the network (fedseg.predict.inference_pipeline), as in training.
PREPROCESSING = {
    "orientation": "RAS",
    "resampling": "to pixdim, bilinear (labels: nearest); none when pixdim is None",
    "intensity": "z-score per channel over the non-zero voxels, or the model's intensity window",
    "inference": "sliding window over patch_size, probabilities mapped back to the input grid",
}
CONVERT_HINT = (
    "make a fedseg model file with `fedseg import-model {path} --config RUN.toml --out model.pt` "
    "(RUN.toml: the run config describing its network, channels, classes, patch size and spacing)"
)


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
    model_args: Mapping[str, Any] = field(default_factory=dict)
    model_source: str = "preset"
    init_from: str = ""  # the weights the run started from (fedseg.initial_model), "" for random
    dp_compatible: bool = False  # trained with DP-SGD: BatchNorm layers were made GroupNorm (fedseg.privacy)
    intensity: IntensityWindow | None = None  # the intensity window trained with (fedseg.intensity); None: z-score
    enhancing_min_voxels: int = 0  # BraTS: a smaller enhancing-tumour prediction becomes core (fedseg.enhancing)
    # fedseg.personal_mix: a global model's chosen weight of a site's personal model in their mean, and a
    # personal model's own weight in it (what `fedseg site personal-model` writes); None: equal weights
    personal_weight: Weights | None = None
    ensemble_weight: Weights | None = None

    @property
    def labels(self) -> LabelScheme:
        """What the network's outputs mean, and how they are post-processed."""
        return LabelScheme(self.label_scheme, self.num_classes, self.region_training, self.enhancing_min_voxels)

    @classmethod
    def from_config(
        cls,
        state_dict: Mapping[str, torch.Tensor],
        config: RunConfig,
        description: str,
        enhancing_min_voxels: int = 0,
        personal_weight: Weights | None = None,
    ) -> ModelCheckpoint:
        """The weights of a run with `config` (its in-channels resolved) and how to apply them
        (`enhancing_min_voxels`: the threshold chosen on validation with postprocess "enhancing-tumour")."""
        spec = model_spec(config)
        return cls(
            state_dict=state_dict,
            model=spec.name,
            model_args=dict(spec.args),
            model_source=spec.source,
            init_from=config.init_from,
            dp_compatible=config.dp_sgd,
            intensity=intensity_window(config),
            num_classes=config.num_classes,
            patch_size=config.patch_size,
            pixdim=config.spacing,  # the grid the sites trained at (None: each scan's stored grid)
            in_channels=config.in_channels or 1,
            description=description,
            label_scheme=config.label_scheme,
            region_training=config.region_training,
            enhancing_min_voxels=enhancing_min_voxels,
            personal_weight=personal_weight,
        )

    def save(self, path: str | Path) -> None:
        """Write atomically (a temporary file beside `path`, then a rename)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(
                {
                    "format": self._format(),
                    "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
                    "model": self.model,
                    "in_channels": self.in_channels,
                    "num_classes": self.num_classes,
                    "patch_size": list(self.patch_size),
                    "pixdim": list(self.pixdim) if self.pixdim is not None else None,
                    "description": self.description,
                    "label_scheme": self.label_scheme,
                    "region_training": self.region_training,
                    "enhancing_min_voxels": self.enhancing_min_voxels,
                    "personal_weight": list(self.personal_weight) if self.personal_weight is not None else None,
                    "ensemble_weight": list(self.ensemble_weight) if self.ensemble_weight is not None else None,
                    "model_args": dict(self.model_args),
                    "model_source": self.model_source,
                    "init_from": self.init_from,
                    "dp_compatible": self.dp_compatible,
                    "intensity": self.intensity.to_list() if self.intensity is not None else None,
                    "preprocessing": {**PREPROCESSING, "intensity": describe(self.intensity)},
                    "fedseg_version": fedseg.__version__,
                },
                tmp,
            )

    def _format(self) -> str:
        if self.ensemble_weight is not None:
            return WEIGHTED_FORMAT
        return POSTPROCESSED_FORMAT if self.enhancing_min_voxels else FORMAT

    @property
    def network(self) -> str:
        """The network as `name(arg=value, ...)`, for messages."""
        return f"{self.model}({format_model_args(self.model_args)})" if self.model_args else self.model

    @classmethod
    def load(cls, path: str | Path) -> ModelCheckpoint:
        """A model file, a run's checkpoint.pt or a run folder (see `load_model_file`)."""
        return load_model_file(path)

    @classmethod
    def from_fields(cls, data: Mapping, path: str | Path) -> ModelCheckpoint:
        """Check a model file's fields, and that its weights fit the network they name
        (CheckpointError naming the file and the fault otherwise)."""
        try:
            checkpoint = cls(**_checked_fields(data))
            checkpoint.labels  # noqa: B018 - the label scheme checks itself (e.g. brats has 4 classes)
        except (KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{path}: not a usable fedseg model file: {first_line(err)}") from None
        try:
            fault = checkpoint.weights_fault()
        except ValueError as err:  # ModelError, or no DP-SGD form of the network
            raise CheckpointError(
                f"{path}: not a usable fedseg model file: 'model' / 'model_args' {checkpoint.network}: "
                f"{first_line(err)}"
            ) from None
        if fault:
            raise CheckpointError(
                f"{path}: weights do not fit model {checkpoint.network} with "
                f"{checkpoint.in_channels} input channel(s), {checkpoint.num_classes} classes: "
                f"{fault}"
            )
        return checkpoint

    def weights_fault(self) -> str | None:
        """What in `state_dict` differs from the named network's parameters (names, shapes), else None;
        ModelError when the network cannot be built. Compared on the meta device (fedseg.models.network_shapes),
        so that a small file naming a huge network allocates nothing."""
        network = network_shapes(self.model, self.in_channels, self.labels.out_channels, self.model_args)
        return weights_fault(
            (make_dp_compatible(network) if self.dp_compatible else network).state_dict(), self.state_dict
        )

    def trainer(
        self, device: str | torch.device | None = None, sw_batch_size: int = SW_BATCH_SIZE
    ) -> SegmentationTrainer:
        """A SegmentationTrainer holding these weights (for sliding-window inference, `sw_batch_size`
        windows per forward pass)."""
        trainer = SegmentationTrainer(
            self.model,
            self.num_classes,
            self.patch_size,
            in_channels=self.in_channels,
            device=device,
            labels=self.labels,
            model_args=self.model_args,
            dp_compatible=self.dp_compatible,
            sw_batch_size=sw_batch_size,
        )
        trainer.set_weights(self.state_dict)
        return trainer


def load_model_file(path: str | Path) -> ModelCheckpoint:
    """Read a model file (fedseg-model/1 or /2), a run's checkpoint.pt, or a run folder (its model.pt);
    CheckpointError naming the file, and for foreign files how to convert them."""
    path = Path(path)
    if path.is_dir():
        for name in (RUN_MODEL, RUN_CHECKPOINT):
            if (path / name).is_file():
                return load_model_file(path / name)
        hint = " (a MONAI bundle: " + CONVERT_HINT.format(path=path) + ")" if (path / "configs").is_dir() else ""
        raise CheckpointError(f"{path}: a folder without {RUN_MODEL} or {RUN_CHECKPOINT}{hint}")
    data = _load(path)
    if isinstance(data, dict) and data.get("format") in READABLE_FORMATS:
        return ModelCheckpoint.from_fields(data, path)
    if isinstance(data, dict) and isinstance(data.get("format"), str) and data["format"].startswith("fedseg-model/"):
        raise CheckpointError(
            f"{path}: model format '{data['format']}' is newer than this fedseg reads "
            f"({', '.join(READABLE_FORMATS)}): upgrade fedseg"
        )
    if _is_run_checkpoint(data):
        return _from_run_checkpoint(data, path)
    if _state_dict_in(data) is not None:
        raise CheckpointError(
            f"{path}: weights without their network (a bare state dict): {CONVERT_HINT.format(path=path)}"
        )
    raise CheckpointError(f"{path}: not a fedseg model file (expected format '{FORMAT}')")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The weights in any file fedseg knows: a model file, a run's checkpoint.pt, or a state dict
    (also under "state_dict" or "model", as checkpoint handlers save them); CheckpointError otherwise."""
    path = Path(path)
    data = _load(path)
    if isinstance(data, dict) and data.get("format") in READABLE_FORMATS:
        return dict(ModelCheckpoint.from_fields(data, path).state_dict)
    if _is_run_checkpoint(data):
        return dict(data["weights"])
    state = _state_dict_in(data)
    if state is None:
        raise CheckpointError(
            f"{path}: holds no weights fedseg can read (a model file, a run's checkpoint.pt or a "
            "state dict mapping names to tensors)"
        )
    return state


def weights_fault(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """What in `found` differs from a network's state dict `expected` (names, shapes, values), else None."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if missing or extra:
        return f"{len(missing)} missing and {len(extra)} unexpected weight(s), e.g. {(missing + extra)[:2]}"
    for key, tensor in expected.items():
        value = found[key]
        if value.layout != torch.strided or value.device.type != "cpu":
            return f"'{key}' is not a dense CPU tensor ({value.layout}, device {value.device.type})"
        if tuple(value.shape) != tuple(tensor.shape):
            return f"'{key}' has shape {tuple(value.shape)}, the network's is {tuple(tensor.shape)}"
        if tensor.is_floating_point() and not value.is_floating_point():
            return f"'{key}' holds {value.dtype}, not floating-point numbers"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"'{key}' holds NaN or infinite values"
        if tensor.is_floating_point() and not bool(torch.isfinite(value.to(tensor.dtype)).all()):
            return f"'{key}' holds values beyond the range of the network's {tensor.dtype}"
    return None


def _load(path: Path) -> object:
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found")
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign pickle protocol: the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load parses untrusted bytes; any failure means unreadable
        if isinstance(err, pickle.UnpicklingError) and "Weights only load failed" in str(err):
            # torch's own message advises weights_only=False, which would run whatever the file holds
            raise CheckpointError(
                f"{path}: not a weights file: it asks to build Python objects a model file never holds "
                "(refused without running them)"
            ) from None
        hint = ""
        if "TorchScript" in str(err) or "constants.pkl" in str(err):
            hint = f" (a TorchScript file: fedseg reads weights; {CONVERT_HINT.format(path=path)} from its state dict)"
        raise CheckpointError(
            f"{path}: cannot read model file: {type(err).__name__}: {first_line(err)}{hint}"
        ) from None


def _state_dict_in(data: object) -> dict[str, torch.Tensor] | None:
    for candidate in (data, *(data.get(k) for k in ("state_dict", "model") if isinstance(data, dict))):
        if (
            isinstance(candidate, Mapping)
            and candidate
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in candidate.items())
        ):
            return dict(candidate)
    return None


def _is_run_checkpoint(data: object) -> TypeGuard[dict[str, Any]]:
    return isinstance(data, dict) and {"weights", "history", "round"} <= set(data) and isinstance(data["history"], dict)


def _from_run_checkpoint(data: dict, path: Path) -> ModelCheckpoint:
    """A run's checkpoint.pt: its weights, described by the run config in its history."""
    values = dict(data["history"].get("config", {}))
    strategy_params = values.pop("strategy-params", {}) or {}
    values.update({k: v for k, v in strategy_params.items() if STRATEGY_PARAM_SEPARATOR in k})
    try:
        config = RunConfig.from_mapping(values)
        description = f"run checkpoint {path.parent.name}, after round {int(data['round'])}"
        threshold = 0
        scored = data["history"]["rounds"][-1]["eval"].values() if data["history"].get("rounds") else []
        if config.chooses_enhancing_threshold:  # as the run would have stored it for these weights
            threshold = choose_min_voxels(scored)[0]
        weight = choose_personal_weight(scored, config.labels)
        model = ModelCheckpoint.from_config(dict(data["weights"]), config, description, threshold, weight)
        fault = model.weights_fault()
    except (ConfigError, ModelError, KeyError, IndexError, TypeError, ValueError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: a run checkpoint whose run config this fedseg cannot use: {first_line(err)}"
        ) from None
    if fault:
        raise CheckpointError(f"{path}: weights do not fit model {model.network}: {fault}")
    return model


def _checked_fields(data: Mapping) -> dict:
    """The dataclass fields of a loaded model file; TypeError/ValueError naming the first bad one."""
    weights = data["state_dict"]
    if not isinstance(weights, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise TypeError("'state_dict' must map names to tensors")
    model = data["model"]
    if not isinstance(model, str):
        raise TypeError(f"'model' must be a network name, got {model!r}")
    source = str(data.get("model_source", "preset"))
    try:
        network_kind(model)
    except ModelError:
        needs = f" (the file needs {source}: install it)" if source.startswith("plugin") else ""
        raise ValueError(f"'model' is {model!r}, which this installation cannot build{needs}") from None
    model_args = data.get("model_args", {})
    if not isinstance(model_args, Mapping) or not all(isinstance(k, str) for k in model_args):
        raise TypeError("'model_args' must map argument names to values")
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
        "model_args": dict(model_args),
        "model_source": source,
        "init_from": str(data.get("init_from", "")),
        "dp_compatible": data.get("dp_compatible", False) is True,
        "intensity": _intensity(data.get("intensity")),
        "enhancing_min_voxels": _whole(data, "enhancing_min_voxels", 0, 2**31 - 1, absent=0),
    }
    if fields["label_scheme"] not in SCHEMES or not isinstance(fields["region_training"], bool):
        raise ValueError(
            f"'label_scheme' {fields['label_scheme']!r} / 'region_training' "
            f"{fields['region_training']!r}: label scheme one of {', '.join(SCHEMES)}, and true or false"
        )
    out_channels = LabelScheme(fields["label_scheme"], fields["num_classes"], fields["region_training"]).out_channels
    for key in ("personal_weight", "ensemble_weight"):
        fields[key] = check_weight(data.get(key), out_channels, key)
    if not all(8 <= p <= 512 for p in fields["patch_size"]):
        raise ValueError(f"'patch_size' {fields['patch_size']} must be 8 to 512 per axis")
    if fields["pixdim"] is not None and not all(0 < p <= MAX_SPACING_MM for p in fields["pixdim"]):
        raise ValueError(f"'pixdim' {fields['pixdim']} must be > 0 and <= {MAX_SPACING_MM:g} mm per axis")
    return fields


def _intensity(values: object) -> IntensityWindow | None:
    """The file's intensity window (None: z-score); ValueError naming the field."""
    if values is None:
        return None
    try:
        return IntensityWindow.from_list(values)
    except IntensityError as err:
        raise ValueError(f"'intensity': {err}") from None


def _whole(data: Mapping, key: str, low: int, high: int, absent: int | None = None) -> int:
    value = data[key] if absent is None else data.get(key, absent)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"'{key}' must be a whole number from {low} to {high}, got {value!r}")
    return value


def _triple(values: Sequence, kind: type, key: str = "value") -> tuple:
    """Three finite numbers (whole ones for `kind` int) as `kind`; ValueError naming `key` otherwise."""
    if (
        not isinstance(values, (list, tuple))
        or len(values) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    ):
        raise ValueError(f"'{key}' must be a list of 3 numbers, got {values!r}")
    if not all(is_finite(v) and (kind is not int or float(v).is_integer()) for v in values):
        whole = " whole" if kind is int else ""
        raise ValueError(f"'{key}' must hold 3 finite{whole} numbers, got {values!r}")
    return tuple(kind(v) for v in values)
