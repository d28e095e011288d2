"""One typed, validated run configuration built from Flower's run config or a TOML file.

Every value is checked before any training starts; a bad value raises `ConfigError`
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedseg.data.transforms import AUGMENTATIONS
from fedseg.enhancing import ENHANCING_TUMOUR, POSTPROCESS
from fedseg.intensity import BUNDLE, IntensityError, parse_intensity
from fedseg.labels import SCHEMES, LabelScheme
from fedseg.limits import MAX_CHANNELS, MAX_NUM_CLASSES, MAX_SPACING_MM
from fedseg.model_args import ModelArgsError, parse_model_args
from fedseg.models import PATCH_MULTIPLE, ModelError, model_choices, model_kwargs, network_kind
from fedseg.optim import OPTIMIZERS, SCHEDULES, round_learning_rate
from fedseg.precision import PRECISIONS
from fedseg.tracking.backends import parse_backends

# Strategy parameters are namespaced by strategy name: `fedprox.proximal-mu`, `dp-noised.clipping-norm`
# (a TOML table `[fedprox]` / `[tool.flwr.app.config.fedprox]` flattens to the same dotted keys).
STRATEGY_PARAM_SEPARATOR = "."

DP_ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")  # Opacus accountants for DP-SGD's ε
DP_NOISE_SOURCES: tuple[str, ...] = ("torch", "secure")  # DP-SGD's random draws (fedseg.privacy)
SYNTHETIC_ANATOMIES: tuple[str, ...] = ("pelvis", "brain")  # fedseg.data.synth.ANATOMIES
# Upper bounds of sizes: beyond them a run cannot finish (or a site cannot hold one batch).
UPPER_BOUNDS = {
    "num-server-rounds": 100_000,
    "local-epochs": 10_000,
    "batch-size": 1024,
    "synthetic-subjects": 1000,
    "synthetic-size": 256,
    "min-sites": 10_000,
    "min-live-sites": 10_000,
    "num-classes": MAX_NUM_CLASSES,
    "seed": 2**32 - 1,
    "round-timeout": 30 * 86400.0,
    "dp-noise-multiplier": 1000.0,
    "dp-max-grad-norm": 1e6,
    "dp-target-epsilon": 1e6,
}
MAX_PATCH_SIDE = 512
MAX_SAM_RHO = 10.0  # a sharpness-aware radius beyond any weight norm's scale
# output-dir: relative ones may not climb out with '..'
PATH_KEYS = ("data-dir", "output-dir", "resume-from", "bundle", "init-from")
# 'strategy': a built-in or plugin name, 'flower:<Class>' or 'package.module:Class' (never a relative import)
MAX_NUM_WORKERS = 256
STRATEGY_SPEC = re.compile(r"[A-Za-z0-9][\w.-]*|flower:[A-Za-z_]\w*|[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


class ConfigError(ValueError):
    """A run-config value is missing, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """Settings of one federated run (keys are the hyphenated names in pyproject)."""

    num_server_rounds: int = 6
    local_epochs: float = 3.0  # passes over the site's data per round; 0.5: half a shuffled pass (fedseg.trainer)
    learning_rate: float = 0.01
    optimizer: str = "adam"
    weight_decay: float = 0.0
    momentum: float = 0.9
    # each site continues its optimizer (Adam's moments, SGD's momentum) from its last round (clients.personal)
    keep_optimizer_state: bool = False
    lr_schedule: str = "constant"
    warmup_rounds: int = 0
    lr_final_ratio: float = 0.0
    # the final model is the mean of the global models of the last swa-rounds rounds (fedseg.weight_average)
    swa_rounds: int = 0
    sam_rho: float = 0.0  # > 0: sharpness-aware local steps of this radius (fedseg.sharpness)
    strategy: str = "fedavg"
    model: str = "unet"
    model_args: str = ""  # the network's keyword arguments, "init_filters=16, dropout_prob=0.1" (fedseg.model_args)
    bundle: str = ""  # a MONAI bundle folder whose network is trained (model = "bundle"; fedseg.bundle)
    init_from: str = ""  # initial global weights: a fedseg model file, run folder or bundle (fedseg.initial_model)
    intensity: str = "z-score"  # "z-score", "window:A,B[,C,D]" or "bundle" (fedseg.intensity)
    num_classes: int = 3
    in_channels: int = 0  # image channels (modalities); 0: inferred from the data (fedseg.data.sites)
    label_scheme: str = "classes"
    region_training: bool = False
    # "enhancing-tumour" (BraTS): the model carries an ET size threshold chosen on the sites' validation Dice
    postprocess: str = "none"
    patch_size: tuple[int, int, int] = (32, 32, 32)
    spacing: tuple[float, float, float] | None = (1.0, 1.0, 1.0)  # mm per voxel to resample to; None: native grid
    batch_size: int = 2
    augmentation: str = "standard"  # training augmentation preset (fedseg.data.transforms.AUGMENTATIONS)
    augmentation_invert: float = 0.0  # "shift" only: probability of negating a z-scored patch
    augmentation_remap: float = 0.0  # "shift" only: probability of a random tissue contrast per patch
    augmentation_structures: float = 0.0  # "shift" only: probability of repainting a patch's labelled structures
    data_dir: str = "synthetic"
    synthetic_subjects: int = 8
    synthetic_size: int = 40
    synthetic_anatomy: str = "pelvis"
    seed: int = 0
    output_dir: str = "runs"
    min_sites: int = 2
    round_timeout: float = 3600.0
    min_live_sites: int = 1
    resume_from: str = ""
    dp_sgd: bool = False
    dp_noise_multiplier: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_target_epsilon: float = 0.0
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"
    dp_physical_batch_size: int = 0  # subjects per forward pass under DP-SGD; 0: batch-size (fedseg.privacy)
    dp_augmentation_multiplicity: int = 1  # augmented patches per subject per DP-SGD draw
    dp_noise_source: str = "torch"  # DP-SGD noise and sampling: "torch" (Opacus) or "secure" (fedseg.noise)
    torch_compile: bool = False
    tracking: str = ""  # "tensorboard", "mlflow" or both, comma-separated (fedseg.tracking); "" = off
    tracking_dir: str = ""  # where the trackers write; "" = the folder holding the run folders
    num_workers: int = 0  # data-loading worker processes at each site (0: loading runs in the training process)
    # "auto" (bf16 autocast on a GPU, fp32 elsewhere), "fp32", "bf16", "fp16" (fedseg.precision)
    precision: str = "auto"
    secure_aggregation: bool = False  # the server sees only the sum of the updates (fedseg.secagg)
    secure_aggregation_bound: float = 16.0  # largest |update value| a site may send under secure aggregation
    strategy_params: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_synthetic_data(self) -> bool:
        """True when sites are generated on the fly instead of read from disk."""
        return self.data_dir == "synthetic"

    def round_learning_rate(self, server_round: int) -> float:
        """The sites' learning rate in round `server_round` (fedseg.optim.round_learning_rate)."""
        return round_learning_rate(
            self.learning_rate,
            server_round,
            self.num_server_rounds,
            self.lr_schedule,
            self.warmup_rounds,
            self.lr_final_ratio,
        )

    @property
    def network_args(self) -> dict[str, Any]:
        """`model-args` as keyword arguments (fedseg.model_args)."""
        return parse_model_args(self.model_args)

    @property
    def chooses_enhancing_threshold(self) -> bool:
        """postprocess "enhancing-tumour": sites score ET thresholds, the model keeps the best (fedseg.enhancing)."""
        return self.postprocess == ENHANCING_TUMOUR

    @property
    def labels(self) -> LabelScheme:
        """How labels are trained and scored (fedseg.labels)."""
        return LabelScheme(self.label_scheme, self.num_classes, self.region_training)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able view, with hyphenated keys as in pyproject."""
        out = {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}
        out["patch-size"] = ",".join(map(str, self.patch_size))
        out["spacing"] = ",".join(map(str, self.spacing)) if self.spacing is not None else ""
        return out

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build and validate from a flat mapping of hyphenated keys (Flower's run_config)."""
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls) if f.name != "strategy_params"}
        kwargs: dict[str, Any] = {}
        strategy_params: dict[str, Any] = {}
        for key, value in values.items():
            if STRATEGY_PARAM_SEPARATOR in key:
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"run-config '{key}' must be a finite number, got {value}")
                strategy_params[key] = value
            elif key in known:
                kwargs[known[key].name] = _coerce(key, value, known[key].type)
            else:
                raise ConfigError(
                    f"unknown run-config key '{key}'; valid keys: {', '.join(sorted(known))}"
                    " (strategy parameters are '<strategy>.<parameter>', e.g. 'fedprox.proximal-mu')"
                )
        config = cls(**kwargs, strategy_params=strategy_params)
        config.validate()
        return config

    @classmethod
    def from_toml(cls, path: str | Path) -> RunConfig:
        """Read a flat TOML file of run-config keys (nested tables become dotted keys)."""
        return cls.from_mapping(flatten(read_toml(path, "run config")))

    def validate(self) -> None:
        """Check ranges and names; raise ConfigError on the first bad value."""
        positive = {
            "num-server-rounds": self.num_server_rounds,
            "batch-size": self.batch_size,
            "synthetic-subjects": self.synthetic_subjects,
            "synthetic-size": self.synthetic_size,
            "min-sites": self.min_sites,
            "min-live-sites": self.min_live_sites,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"run-config '{key}' must be >= 1, got {value}")
        if not self.local_epochs > 0:
            raise ConfigError(
                f"run-config 'local-epochs' must be > 0 (0.5: half a pass per round), got {self.local_epochs}"
            )
        _validate_bounds(self)
        if not 0.0 < self.learning_rate < 10.0:
            raise ConfigError(f"run-config 'learning-rate' must be in (0, 10), got {self.learning_rate}")
        _validate_optimizer(self)
        if self.round_timeout <= 0:
            raise ConfigError(f"run-config 'round-timeout' must be > 0 seconds, got {self.round_timeout}")
        if self.num_classes < 2:
            raise ConfigError(f"run-config 'num-classes' must be >= 2 (background + 1), got {self.num_classes}")
        _validate_model(self)
        if any(p < 8 for p in self.patch_size):
            raise ConfigError(f"run-config 'patch-size' must be >= 8 per axis, got {self.patch_size}")
        multiple = PATCH_MULTIPLE.get(self.model, 1)
        if any(p % multiple for p in self.patch_size):
            raise ConfigError(
                f"run-config 'patch-size' {self.patch_size}: model '{self.model}' needs every side to be a multiple "
                f"of {multiple}"
            )
        if not 0 <= self.in_channels <= MAX_CHANNELS:
            raise ConfigError(
                f"run-config 'in-channels' must be 0 (inferred from the data) to {MAX_CHANNELS}, got {self.in_channels}"
            )
        if self.model == "ahnet" and self.in_channels > 1:
            raise ConfigError(f"run-config 'in-channels' is {self.in_channels}; model 'ahnet' takes 1 channel")
        _validate_labels(self)
        if self.spacing is not None and not all(0 < s <= MAX_SPACING_MM for s in self.spacing):
            raise ConfigError(
                f"run-config 'spacing' must be > 0 and <= {MAX_SPACING_MM:g} mm per axis (\"\" keeps the native grid), "
                f"got {self.spacing}"
            )
        if self.uses_synthetic_data and min(self.patch_size) > self.synthetic_size:
            raise ConfigError(
                f"run-config 'patch-size' {self.patch_size} exceeds 'synthetic-size' {self.synthetic_size}"
            )
        _validate_augmentation(self)
        _validate_dp(self)
        _validate_runtime(self)
        _validate_secure_aggregation(self)


def _validate_model(config: RunConfig) -> None:
    """`model`, `model-args` and `bundle`: a known network whose signature takes the arguments (the network
    itself is built and run once on a dummy batch before round 1, fedseg.network_check)."""
    if config.intensity != BUNDLE:
        try:
            parse_intensity(config.intensity)
        except IntensityError as err:
            raise ConfigError(f"run-config 'intensity': {err}") from None
    if config.model == "bundle" or config.bundle:
        if not (config.model == "bundle" and config.bundle):
            raise ConfigError(
                "run-config 'bundle' and model = \"bundle\" go together: set both to train a MONAI "
                f"bundle's network (model is {config.model!r}, bundle {config.bundle!r})"
            )
        if config.model_args:
            raise ConfigError("run-config 'model-args' does not apply to a bundle: its network_def gives the arguments")
        return
    if config.intensity == BUNDLE:
        raise ConfigError("run-config 'intensity' is \"bundle\": that needs model = \"bundle\" (and 'bundle')")
    try:
        network_kind(config.model)
    except ModelError:
        raise ConfigError(f"run-config 'model' is '{config.model}'; choose one of: {model_choices()}") from None
    try:
        model_kwargs(config.model, 1, 2, config.network_args)
    except (ModelArgsError, ModelError) as err:
        raise ConfigError(f"run-config 'model-args': {err}") from None


def _validate_augmentation(config: RunConfig) -> None:
    """`augmentation` (a preset of fedseg.data.transforms), `augmentation-invert`, `augmentation-remap` and
    `augmentation-structures` (probabilities "shift" uses)."""
    if config.augmentation not in AUGMENTATIONS:
        raise ConfigError(
            f"run-config 'augmentation' is '{config.augmentation}'; choose one of: {', '.join(AUGMENTATIONS)}"
        )
    for key, value, effect in (
        ("augmentation-invert", config.augmentation_invert, "inverts contrast"),
        ("augmentation-remap", config.augmentation_remap, "remaps tissue contrast"),
        ("augmentation-structures", config.augmentation_structures, "repaints labelled structures"),
    ):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"run-config '{key}' must be in [0, 1], got {value}")
        if value > 0 and config.augmentation != "shift":
            raise ConfigError(
                f"run-config '{key}' is {value} but only augmentation 'shift' {effect} (augmentation is "
                f"'{config.augmentation}'): set augmentation = \"shift\" or '{key}' to 0"
            )


def _validate_bounds(config: RunConfig) -> None:
    """Finite numbers, upper bounds of sizes, a seed >= 0, min-live-sites <= min-sites, usable paths."""
    values = config.to_dict()
    for item in dataclasses.fields(config):
        key, value = item.name.replace("_", "-"), getattr(config, item.name)
        numbers = value if isinstance(value, tuple) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
            raise ConfigError(f"run-config '{key}' must be a finite number, got {values[key]}")
    for key, bound in UPPER_BOUNDS.items():
        if values[key] > bound:
            raise ConfigError(f"run-config '{key}' must be <= {bound:g}, got {values[key]}")
    if config.seed < 0:
        raise ConfigError(f"run-config 'seed' must be >= 0, got {config.seed}")
    if not STRATEGY_SPEC.fullmatch(config.strategy):
        raise ConfigError(
            f"run-config 'strategy' is {config.strategy!r}: give a strategy name, "
            "'flower:<Class>' or 'package.module:Class'"
        )
    if max(config.patch_size) > MAX_PATCH_SIDE:
        raise ConfigError(f"run-config 'patch-size' must be <= {MAX_PATCH_SIDE} per axis, got {config.patch_size}")
    if config.min_live_sites > config.min_sites:
        raise ConfigError(
            f"run-config 'min-live-sites' ({config.min_live_sites}) must be <= 'min-sites' "
            f"({config.min_sites}): a run never has more live sites than it started with"
        )
    for key in PATH_KEYS:
        if any(c in values[key] for c in "\0\n\r"):
            raise ConfigError(f"run-config '{key}' holds a NUL or line-break character: {values[key]!r}")
    output = Path(config.output_dir)
    if not config.output_dir.strip():
        raise ConfigError("run-config 'output-dir' must name a folder, got ''")
    if not output.expanduser().is_absolute() and os.path.normpath(output).split(os.sep)[0] == "..":
        raise ConfigError(
            f"run-config 'output-dir' {config.output_dir!r} climbs out of the working folder; "
            "give a folder below it, or an absolute path"
        )


def _validate_optimizer(config: RunConfig) -> None:
    """`optimizer`, its settings and the learning-rate schedule over the federated budget (fedseg.optim)."""
    if config.optimizer not in OPTIMIZERS:
        raise ConfigError(f"run-config 'optimizer' is '{config.optimizer}'; choose one of: {', '.join(OPTIMIZERS)}")
    if not 0.0 <= config.weight_decay < 1.0:
        raise ConfigError(f"run-config 'weight-decay' must be in [0, 1), got {config.weight_decay}")
    if not 0.0 <= config.momentum < 1.0:
        raise ConfigError(f"run-config 'momentum' must be in [0, 1), got {config.momentum}")
    if config.lr_schedule not in SCHEDULES:
        raise ConfigError(f"run-config 'lr-schedule' is '{config.lr_schedule}'; choose one of: {', '.join(SCHEDULES)}")
    if not 0 <= config.warmup_rounds < config.num_server_rounds:
        raise ConfigError(f"run-config 'warmup-rounds' must be in [0, num-server-rounds), got {config.warmup_rounds}")
    if not 0.0 <= config.lr_final_ratio <= 1.0:
        raise ConfigError(f"run-config 'lr-final-ratio' must be in [0, 1], got {config.lr_final_ratio}")
    if not 0.0 <= config.sam_rho <= MAX_SAM_RHO:
        raise ConfigError(f"run-config 'sam-rho' must be in [0, {MAX_SAM_RHO:g}], got {config.sam_rho}")
    if config.sam_rho > 0 and (config.dp_sgd or config.precision == "fp16"):
        raise ConfigError(
            "run-config 'sam-rho' needs plain gradients: sharpness-aware steps cannot be combined with "
            f"{'dp-sgd' if config.dp_sgd else 'precision fp16 (loss scaling)'}; set 'sam-rho' to 0"
        )
    if not 0 <= config.swa_rounds <= config.num_server_rounds:
        raise ConfigError(f"run-config 'swa-rounds' must be in [0, num-server-rounds], got {config.swa_rounds}")


def _validate_labels(config: RunConfig) -> None:
    """`label-scheme`, `region-training` and what synthetic data can provide."""
    if config.label_scheme not in SCHEMES:
        raise ConfigError(f"run-config 'label-scheme' is '{config.label_scheme}'; choose one of: {', '.join(SCHEMES)}")
    if config.label_scheme == "brats" and config.num_classes != 4:
        raise ConfigError(
            f"run-config 'num-classes' is {config.num_classes}; label-scheme 'brats' has 4 "
            "(background, necrotic/non-enhancing core, edema, enhancing tumour)"
        )
    if config.region_training and config.label_scheme != "brats":
        raise ConfigError("run-config 'region-training' needs label-scheme 'brats' (its nested tumour regions)")
    if config.postprocess not in POSTPROCESS:
        choices = ", ".join(POSTPROCESS)
        raise ConfigError(f"run-config 'postprocess' is '{config.postprocess}'; choose one of: {choices}")
    if config.chooses_enhancing_threshold and config.label_scheme != "brats":
        raise ConfigError(
            "run-config 'postprocess' 'enhancing-tumour' needs label-scheme 'brats' (its enhancing tumour), "
            f"got '{config.label_scheme}'"
        )
    if config.synthetic_anatomy not in SYNTHETIC_ANATOMIES:
        raise ConfigError(
            f"run-config 'synthetic-anatomy' is '{config.synthetic_anatomy}'; choose one of: "
            f"{', '.join(SYNTHETIC_ANATOMIES)}"
        )
    if config.uses_synthetic_data and config.synthetic_anatomy == "brain" and config.label_scheme != "brats":
        raise ConfigError(
            "run-config 'synthetic-anatomy' 'brain' writes BraTS labels: set label-scheme = \"brats\" "
            "and num-classes = 4"
        )


def _validate_secure_aggregation(config: RunConfig) -> None:
    """`secure-aggregation` needs three sites; its bound keeps the 64-bit ring from overflowing (fedseg.secagg.ring)."""
    if not 0.0 < config.secure_aggregation_bound <= 2.0**20:
        raise ConfigError(
            f"run-config 'secure-aggregation-bound' must be in (0, 2^20], got {config.secure_aggregation_bound}"
        )
    if config.secure_aggregation and config.min_sites < 3:
        raise ConfigError(
            f"run-config 'secure-aggregation' needs 'min-sites' >= 3, got {config.min_sites}: "
            "with two sites each one learns the other's update from the new global model"
        )


def _validate_dp(config: RunConfig) -> None:
    """The `dp-*` keys (DP-SGD at the sites, see fedseg.privacy): ranges always, combinations when on."""
    if config.dp_noise_multiplier < 0:
        raise ConfigError(f"run-config 'dp-noise-multiplier' must be >= 0, got {config.dp_noise_multiplier}")
    if config.dp_max_grad_norm <= 0:
        raise ConfigError(f"run-config 'dp-max-grad-norm' must be > 0, got {config.dp_max_grad_norm}")
    if config.dp_target_epsilon < 0:
        raise ConfigError(f"run-config 'dp-target-epsilon' must be >= 0 (0: no budget), got {config.dp_target_epsilon}")
    if not 0.0 < config.dp_delta < 1.0:
        raise ConfigError(f"run-config 'dp-delta' must be in (0, 1), got {config.dp_delta}")
    if config.dp_accountant not in DP_ACCOUNTANTS:
        raise ConfigError(
            f"run-config 'dp-accountant' is '{config.dp_accountant}'; choose one of: {', '.join(DP_ACCOUNTANTS)}"
        )
    if not 0 <= config.dp_physical_batch_size <= UPPER_BOUNDS["batch-size"]:
        raise ConfigError(
            f"run-config 'dp-physical-batch-size' must be 0 (batch-size) to {UPPER_BOUNDS['batch-size']}, "
            f"got {config.dp_physical_batch_size}"
        )
    if not 1 <= config.dp_augmentation_multiplicity <= 64:
        raise ConfigError(
            f"run-config 'dp-augmentation-multiplicity' must be in [1, 64], got {config.dp_augmentation_multiplicity}"
        )
    if config.dp_noise_source not in DP_NOISE_SOURCES:
        raise ConfigError(
            f"run-config 'dp-noise-source' is '{config.dp_noise_source}'; choose one of: {', '.join(DP_NOISE_SOURCES)}"
        )
    if not config.dp_sgd:
        return
    if not float(config.local_epochs).is_integer():
        raise ConfigError(
            f"run-config 'local-epochs' is {config.local_epochs:g}; DP-SGD trains whole epochs of Poisson-sampled "
            "steps (the accountant counts them): give a whole number"
        )
    if config.dp_noise_multiplier == 0 and config.dp_target_epsilon == 0:
        raise ConfigError(
            "run-config 'dp-sgd' is on but neither 'dp-noise-multiplier' nor 'dp-target-epsilon' is > 0: "
            "set the noise, or the ε budget to derive it from"
        )


def _validate_runtime(config: RunConfig) -> None:
    """`tracking` (backend names; whether they are installed is checked where the server runs),
    `tracking-dir`, `num-workers` and `precision`."""
    try:
        parse_backends(config.tracking)
    except ValueError as err:
        raise ConfigError(f"run-config 'tracking': {err}") from None
    if any(c in config.tracking_dir for c in "\0\n\r"):
        raise ConfigError(f"run-config 'tracking-dir' holds a NUL or line-break character: {config.tracking_dir!r}")
    if not 0 <= config.num_workers <= MAX_NUM_WORKERS:
        raise ConfigError(f"run-config 'num-workers' must be 0 to {MAX_NUM_WORKERS}, got {config.num_workers}")
    if config.precision not in PRECISIONS:
        raise ConfigError(f"run-config 'precision' is '{config.precision}'; choose one of: {', '.join(PRECISIONS)}")
    if config.precision == "fp16" and config.dp_sgd:
        raise ConfigError(
            "run-config 'precision' fp16 cannot be combined with dp-sgd (Opacus' per-subject gradients "
            "are not loss-scaled): use bf16 or fp32"
        )


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert one raw value to the field's type or raise ConfigError naming the key."""
    kind = str(annotation)
    if kind.startswith("tuple[float"):
        return None if value == "" else _parse_triple(key, value, float, "1.0,1.0,3.0")
    if kind.startswith("tuple[int"):
        return _parse_triple(key, value, int, "32,32,32")
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"run-config '{key}' must be an integer, got {value!r}")
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"run-config '{key}' must be true or false, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run-config '{key}' must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"run-config '{key}' must be a string, got {value!r}")
    return value


def _parse_triple(key: str, value: Any, number: type, example: str) -> tuple:
    """Accept one number (the same on every axis) or three, e.g. 32 or "32,32,16" (also "32x32x16")."""
    parts = str(value).replace("x", ",").split(",")
    try:
        sizes = tuple(number(p) for p in parts)
    except ValueError as err:
        raise ConfigError(f"run-config '{key}' must be like \"{example}\", got {value!r}") from err
    if len(sizes) == 1:
        sizes = sizes * 3
    if len(sizes) != 3:
        raise ConfigError(f"run-config '{key}' needs 1 or 3 sizes, got {value!r}")
    return sizes


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """Parse a TOML file; ConfigError naming the file when it cannot be read or parsed."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: cannot read {what}: not UTF-8 text (byte {err.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: cannot read {what}: nested too deeply") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"{path}: cannot read {what}: {err}") from err


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables → dotted keys, as Flower flattens `[tool.flwr.app.config]`."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
