"""MONAI bundles as a site's network: `model = "bundle"`, `bundle = "<bundle folder>"`.

What of a bundle fedseg honours:
- the network: `network_def` of `configs/train.*` (else `configs/inference.*`; JSON or YAML), read with
  `monai.bundle.ConfigParser` (references and expressions resolved), when its `_target_` is a class
  of `monai.networks.nets` and every argument resolves to a plain value; the model file then holds
  that class and those arguments, so `fedseg predict` needs no bundle;
- its weights, `models/model.pt` (a state dict, or one under "model"), as the initial global model
  (unless run-config `init-from` names other weights);
- its channels: `in_channels` / `out_channels` must equal the run's in-channels and the label
  scheme's outputs;
- its intensity window (`ScaleIntensityRanged`) with run-config `intensity = "bundle"`
  (fedseg.intensity), in training, evaluation and prediction.
Compared, and reported where they differ (the run config decides): the preprocessing's resampling
(`Spacingd` pixdim vs `spacing`), intensity normalisation (vs `intensity`), crop / window size vs
`patch-size`, and the post-processing's activation (softmax vs sigmoid). Not used: the bundle's
trainer, optimizer, loss, handlers and data lists (fedseg trains with its own loop, the run config's
optimizer and Dice-CE loss).
A bundle's config is code (its `$` expressions run): use bundles you trust.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import monai.networks.nets as monai_nets
import torch
from monai.bundle import ConfigParser

from fedseg.errors import first_line
from fedseg.intensity import IntensityError, IntensityWindow
from fedseg.json_records import read_json_object

CONFIG_NAMES = ("train", "inference")
CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
WEIGHTS = Path("models") / "model.pt"
PLAIN = (bool, int, float, str, type(None))


class BundleError(ValueError):
    """A bundle cannot be used; the message names the bundle file and the problem."""


@dataclass(frozen=True)
class BundleNetwork:
    """A bundle's network as a monai.networks.nets class and plain keyword arguments."""

    path: Path
    name: str  # class of monai.networks.nets
    args: dict[str, Any]  # without in_channels / out_channels
    in_channels: int | None
    out_channels: int | None
    description: str  # "<bundle name> <version>" from configs/metadata.json, else the folder name
    preprocessing: dict[str, Any] = field(default_factory=dict)  # what fedseg compares, see `differences`

    @property
    def weights_file(self) -> Path | None:
        path = self.path / WEIGHTS
        return path if path.is_file() else None


def read_bundle(path: str | Path) -> BundleNetwork:
    """The network of the bundle folder `path` (cached while its config files are unchanged)."""
    folder = Path(path).expanduser().resolve()
    config_file = _config_file(folder)
    return _read(folder, config_file, config_file.stat().st_mtime_ns)


def bundle_weights(bundle: BundleNetwork) -> dict[str, torch.Tensor]:
    """The bundle's models/model.pt as a state dict; BundleError naming the file otherwise."""
    path = bundle.weights_file
    if path is None:
        raise BundleError(f"{bundle.path / WEIGHTS}: the bundle has no weights file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - untrusted bytes: any failure means unreadable
        raise BundleError(
            f"{path}: cannot read the bundle's weights: {type(err).__name__}: {first_line(err)}"
        ) from None
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"]  # saved by a checkpoint handler with other objects beside the network
    if not isinstance(data, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise BundleError(f"{path}: not a state dict (names to tensors); fedseg reads a bundle's weights in that form")
    return dict(data)


def differences(
    bundle: BundleNetwork,
    spacing: tuple[float, ...] | None,
    patch_size: tuple[int, ...],
    window: IntensityWindow | None = None,
) -> list[str]:
    """Where the bundle's pre/post-processing differs from the run's (one line each, for the log);
    `window`: the run's intensity window (None: z-score)."""
    found = bundle.preprocessing
    lines = []
    pixdim = found.get("pixdim")
    if pixdim is not None and (spacing is None or not _same(pixdim, spacing)):
        lines.append(
            f"the bundle resamples to {pixdim} mm; the run uses run-config 'spacing' "
            f"{'native grid' if spacing is None else ','.join(map(str, spacing))}"
        )
    if found.get("intensity") == "ScaleIntensityRanged" and found.get("window") != window:
        lines.append(
            f"the bundle windows intensities (ScaleIntensityRanged{_window_text(found.get('window'))}); the "
            f"run {'z-scores each channel' if window is None else f'uses {window}'} (run-config 'intensity'; "
            '"bundle" takes the bundle\'s)'
        )
    elif found.get("intensity") == "NormalizeIntensityd" and window is not None:
        lines.append(
            f"the bundle z-scores intensities (NormalizeIntensityd); the run uses {window} (run-config 'intensity')"
        )
    roi = found.get("roi_size")
    if roi is not None and not _same(roi, patch_size):
        lines.append(
            f"the bundle crops / infers on {roi} voxels; the run uses run-config 'patch-size' "
            f"{','.join(map(str, patch_size))}"
        )
    if found.get("activation") == "sigmoid":
        lines.append(
            "the bundle's post-processing uses sigmoid; fedseg uses softmax (label-scheme 'classes') "
            "or sigmoid per BraTS region (region-training)"
        )
    return lines


def _config_file(folder: Path) -> Path:
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder not found")
    for name in CONFIG_NAMES:
        for suffix in CONFIG_SUFFIXES:
            path = folder / "configs" / f"{name}{suffix}"
            if path.is_file():
                return path
    raise BundleError(f"{folder}: no configs/train.json|yaml or configs/inference.json|yaml (not a MONAI bundle?)")


@lru_cache(maxsize=8)
def _read(folder: Path, config_file: Path, _mtime: int) -> BundleNetwork:
    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
    except Exception as err:  # noqa: BLE001 - JSON/YAML errors of a user's file: one line
        raise BundleError(f"{config_file}: cannot read: {type(err).__name__}: {first_line(err)}") from None
    parser["bundle_root"] = str(folder)
    raw = parser.get("network_def")
    if not isinstance(raw, Mapping) or "_target_" not in raw:
        raise BundleError(f"{config_file}: no 'network_def' with a '_target_' (the bundle's network)")
    name = _monai_class(str(raw["_target_"]), config_file)
    args = {}
    for key in raw:
        if key.startswith("_"):
            continue
        try:
            value = parser.get_parsed_content(f"network_def::{key}")
        except Exception as err:  # noqa: BLE001 - a reference or expression of the bundle failed
            raise BundleError(
                f"{config_file}: network_def '{key}' cannot be resolved: {type(err).__name__}: {first_line(err)}"
            ) from None
        if not _plain(value):
            raise BundleError(
                f"{config_file}: network_def '{key}' is {type(value).__name__}, not a plain value "
                "(number, string, list, dict): fedseg cannot describe it in a model file"
            )
        args[key] = value
    if args.pop("spatial_dims", 3) != 3:
        raise BundleError(f"{config_file}: network_def 'spatial_dims' must be 3 (fedseg segments 3D volumes)")
    in_channels, out_channels = args.pop("in_channels", None), args.pop("out_channels", None)
    return BundleNetwork(folder, name, args, in_channels, out_channels, _description(folder), _processing(parser.get()))


def _monai_class(target: str, config_file: Path) -> str:
    name = target.rsplit(".", 1)[-1]
    cls = getattr(monai_nets, name, None)
    if cls is None or ("." in target and not target.startswith("monai.")):
        raise BundleError(
            f"{config_file}: network_def '_target_' {target!r} is not a class of monai.networks.nets; "
            "fedseg trains bundles built from MONAI's networks (package a custom one as a "
            "fedseg.models plugin)"
        )
    return name


def _plain(value: Any) -> bool:
    if isinstance(value, PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def _description(folder: Path) -> str:
    meta = folder / "configs" / "metadata.json"
    try:
        data = read_json_object(meta)  # capped: a metadata.json of gigabytes is no description
        return f"{data.get('name', folder.name)} {data.get('version', '')}".strip()
    except (OSError, ValueError, AttributeError):
        return folder.name


def _processing(config: Any) -> dict[str, Any]:
    """The settings fedseg compares, from the first transform of each kind in the bundle's config."""
    found: dict[str, Any] = {}
    for node in _targets(config):
        target = str(node["_target_"]).rsplit(".", 1)[-1]
        if target in ("Spacingd", "Spacing") and _plain(node.get("pixdim")):
            found.setdefault("pixdim", node.get("pixdim"))
        elif target in ("ScaleIntensityRanged", "NormalizeIntensityd") and "intensity" not in found:
            found["intensity"] = target
            if target == "ScaleIntensityRanged":
                found["window"] = _window(node)
        elif target in ("RandCropByPosNegLabeld", "RandSpatialCropd", "RandCropByLabelClassesd"):
            size = node.get("spatial_size", node.get("roi_size"))
            if _plain(size):
                found.setdefault("roi_size", size)
        elif target == "SlidingWindowInferer" and _plain(node.get("roi_size")):
            found.setdefault("roi_size", node.get("roi_size"))
        elif target in ("Activationsd", "Activations"):
            found.setdefault("activation", "sigmoid" if node.get("sigmoid") else "softmax")
    return found


def _window(node: Mapping[str, Any]) -> IntensityWindow | None:
    """A ScaleIntensityRanged's settings when they are plain numbers (MONAI's defaults: [0, 1], no clipping)."""
    values = [node.get("a_min"), node.get("a_max"), node.get("b_min", 0.0), node.get("b_max", 1.0)]
    values = [0.0 if v is None and i == 2 else 1.0 if v is None and i == 3 else v for i, v in enumerate(values)]
    clip = node.get("clip", False)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) or not isinstance(clip, bool):
        return None
    try:
        a_min, a_max, b_min, b_max = (float(v) for v in values)
        return IntensityWindow(a_min, a_max, b_min, b_max, clip=clip)
    except (IntensityError, OverflowError):  # OverflowError: an integer past float range
        return None


def _window_text(window: IntensityWindow | None) -> str:
    return f": {window}" if window is not None else ""


def _targets(node: Any) -> Iterator[Mapping[str, Any]]:
    if isinstance(node, Mapping):
        if "_target_" in node:
            yield node
        for value in node.values():
            yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _same(a: Any, b: Any) -> bool:
    try:
        a = [float(a)] * len(b) if isinstance(a, (int, float)) else [float(v) for v in a]
        return a == [float(v) for v in b]
    except (TypeError, ValueError):
        return False
