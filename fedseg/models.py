"""3D segmentation networks by name: `build_model(name, in_ch, out_ch, args)`.

A name is one of
- a preset (`MODEL_NAMES`): a MONAI network with fedseg's arguments, sized so CPU simulations stay
  quick (`args` override them, e.g. `channels=(32, 64, 128, 256)` for "unet");
- a network plugin installed under the `fedseg.models` entry-point group (fedseg.model_plugins);
- a class of `monai.networks.nets` (`SegResNet`, `UNETR`, `SwinUNETR`, `BasicUNet`, ...), built
  with `args` as its keyword arguments.
fedseg sets `in_channels`, `out_channels` and `spatial_dims` (3); every network maps a
`(batch, in_channels, D, H, W)` tensor to `(batch, out_channels, D, H, W)` logits (checked before
round 1 by fedseg.network_check). Preset patch sides must be multiples of `PATCH_MULTIPLE[name]`.
"""

from __future__ import annotations

import inspect
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import monai.networks.nets as monai_nets
import torch
from monai.networks.nets import AHNet, DynUNet, SegResNet, UNet
from torch import nn
from torch.nn.modules.module import (
    register_module_buffer_registration_hook,
    register_module_parameter_registration_hook,
)

from fedseg.model_plugins import (
    ModelError,
    NetworkFactory,
    load_plugin,
    plugin_entry_points,
    plugin_source,
)

# preset name → (MONAI class, fedseg's keyword arguments)
PRESETS: dict[str, tuple[type[nn.Module], dict[str, Any]]] = {
    # affine instance norm, as nnU-Net's: FedBN has per-site scales and shifts to keep
    "unet": (
        UNet,
        {
            "channels": (16, 32, 64, 128),
            "strides": (2, 2, 2),
            "num_res_units": 2,
            "norm": ("instance", {"affine": True}),
        },
    ),
    "segresnet": (SegResNet, {"init_filters": 8}),
    "dynunet": (
        DynUNet,
        {
            "kernel_size": [3, 3, 3, 3],
            "strides": [1, 2, 2, 2],
            "upsample_kernel_size": [2, 2, 2],
            "filters": [16, 32, 64, 128],
        },
    ),
    # AHNet, the network of the prostate study (Sarma et al. 2021); its 3D form takes one channel
    "ahnet": (AHNet, {"layers": (2, 2, 2, 2), "psp_block_num": 0}),
}
MODEL_NAMES: tuple[str, ...] = tuple(PRESETS)
PATCH_MULTIPLE: dict[str, int] = {"unet": 8, "segresnet": 8, "dynunet": 8, "ahnet": 32}
SET_BY_FEDSEG = {"in_channels": "in-channels", "out_channels": "num-classes"}  # argument → the run-config key

NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)  # batch / instance, group, layer


@dataclass(frozen=True)
class NetworkKind:
    """What a model name resolves to: the factory, its preset arguments and where it comes from."""

    factory: NetworkFactory
    defaults: Mapping[str, Any]
    source: str  # "preset", "monai" or "plugin <distribution> <version>"


def network_kind(name: str) -> NetworkKind:
    """Resolve a model name: preset, then plugin, then MONAI class; ModelError listing the choices."""
    if name in PRESETS:
        cls, defaults = PRESETS[name]
        return NetworkKind(cls, defaults, "preset")
    plugins = plugin_entry_points(frozenset(PRESETS))
    if name in plugins:
        return NetworkKind(load_plugin(plugins[name]), {}, plugin_source(plugins[name]))
    found = getattr(monai_nets, name, None)
    if isinstance(found, type) and issubclass(found, nn.Module) and not name.startswith("_"):
        return NetworkKind(found, {}, "monai")
    raise ModelError(f"unknown model '{name}'; choose one of: {model_choices()}")


def model_choices() -> str:
    """The model names a run config may give, for error messages."""
    plugins = sorted(plugin_entry_points(frozenset(PRESETS)))
    installed = f", or an installed plugin: {', '.join(plugins)}" if plugins else ""
    return (
        f"{', '.join(MODEL_NAMES)}, \"bundle\" (with run-config 'bundle'), a class of monai.networks.nets "
        f"(e.g. SegResNet, UNETR, BasicUNet){installed}"
    )


def model_kwargs(
    name: str, in_channels: int, out_channels: int, args: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The keyword arguments `build_model` passes, checked against the network's signature."""
    kind = network_kind(name)
    args = dict(args or {})
    for arg, key in SET_BY_FEDSEG.items():
        if arg in args:
            raise ModelError(f"model argument '{arg}' is set by fedseg: give run-config '{key}' instead")
    kwargs = {**kind.defaults, **args, "in_channels": in_channels, "out_channels": out_channels}
    try:
        parameters = inspect.signature(kind.factory).parameters
    except (TypeError, ValueError):
        return kwargs  # a builtin without a signature: the call itself will tell
    if "spatial_dims" in parameters and "spatial_dims" not in kwargs:
        kwargs["spatial_dims"] = 3
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if not takes_any and not {"in_channels", "out_channels"} <= set(parameters):
        raise ModelError(
            f"model '{name}' has no in_channels/out_channels arguments: not a segmentation network fedseg can build"
        )
    unknown = [arg for arg in args if arg not in parameters]
    if unknown and not takes_any:
        accepted = ", ".join(p for p in parameters if p not in (*SET_BY_FEDSEG, "spatial_dims"))
        raise ModelError(f"model '{name}' takes no argument '{unknown[0]}' (its arguments: {accepted})")
    try:
        inspect.signature(kind.factory).bind(**kwargs)
    except TypeError as err:
        raise ModelError(f"model '{name}': {err}") from None
    return kwargs


def build_model(name: str, in_channels: int, out_channels: int, args: Mapping[str, Any] | None = None) -> nn.Module:
    """A fresh, randomly initialised network `name` with `args` (see the module docstring)."""
    if name == "ahnet" and in_channels != 1:
        raise ModelError(f"model 'ahnet' takes 1 input channel, got {in_channels}")
    kwargs = model_kwargs(name, in_channels, out_channels, args)
    try:
        model = network_kind(name).factory(**kwargs)
    except Exception as err:  # noqa: BLE001 - a network's own argument checks (assert, ValueError, ...)
        raise ModelError(
            f"model '{name}' cannot be built with these arguments: {type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        ) from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model '{name}' returned {type(model).__name__}, not a torch.nn.Module")
    return model


def network_shapes(name: str, in_channels: int, out_channels: int, args: Mapping[str, Any] | None = None) -> nn.Module:
    """Network `name` with its parameters and buffers on the meta device: their names and shapes (and
    count) without the memory, however large the arguments make it. Built on the meta device, or, for a
    network whose construction needs real numbers (e.g. SwinUNETR's `.item()`), with each parameter and
    buffer moved there as it is registered (before a layer initialises it). ModelError as build_model;
    the network's warnings are left out (a real build shows them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return build_model(name, in_channels, out_channels, args)
        except ModelError:
            with _registered_on_meta():
                return build_model(name, in_channels, out_channels, args)


@contextmanager
def _registered_on_meta() -> Iterator[None]:
    """Parameters and buffers that modules register in this thread meanwhile are moved to the meta device."""
    thread = threading.get_ident()

    def to_meta(module: nn.Module, name: str, tensor: torch.Tensor | None) -> torch.Tensor | None:
        if tensor is None or threading.get_ident() != thread:
            return None
        if isinstance(tensor, nn.Parameter):
            return nn.Parameter(tensor.to("meta"), requires_grad=tensor.requires_grad)
        return tensor.to("meta")

    # torch annotates the hooks as returning None, yet registers the tensor a hook returns (as documented)
    handles = [
        register_module_parameter_registration_hook(to_meta),  # type: ignore[arg-type]
        register_module_buffer_registration_hook(to_meta),  # type: ignore[arg-type]
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_parameters(model: nn.Module) -> int:
    """Trainable and frozen parameters (not buffers)."""
    return sum(p.numel() for p in model.parameters())


def norm_state_keys(model: nn.Module) -> frozenset[str]:
    """State-dict keys of the model's normalisation layers: affine weights, biases, running statistics
    (what FedBN keeps at each site)."""
    prefixes = tuple(f"{name}." for name, module in model.named_modules() if isinstance(module, NORM_LAYERS))
    return _with_aliases(model, {key for key in model.state_dict() if key.startswith(prefixes)})


def head_state_keys(model: nn.Module, out_channels: int) -> frozenset[str]:
    """State-dict keys of the model's output stage (what FedPer keeps personal at each site): the last
    convolution, which must produce the `out_channels` class channels, the convolutions before it that
    feed it class channels too, and every module registered between them (e.g. a normalisation).
    ValueError when the last convolution produces other channels."""
    modules = list(model.named_modules())
    convolutions = [(i, module) for i, (_, module) in enumerate(modules) if isinstance(module, nn.modules.conv._ConvNd)]
    if not convolutions or convolutions[-1][1].out_channels != out_channels:
        raise ValueError(
            f"the network's last convolution does not produce its {out_channels} output channels: "
            "it has no output stage to keep"
        )
    first, fed = convolutions[-1][0], convolutions[-1][1].in_channels
    for index, module in reversed(convolutions[:-1]):
        if fed != out_channels or module.out_channels != out_channels:
            break
        first, fed = index, module.in_channels
    prefixes = tuple(f"{name}." for name, _ in modules[first : convolutions[-1][0] + 1])
    return _with_aliases(model, {key for key in model.state_dict() if key.startswith(prefixes)})


def _with_aliases(model: nn.Module, keys: set[str]) -> frozenset[str]:
    """`keys` and every other state-dict key of the same tensors (a module registered under two names,
    such as DynUNet's `skip_layers`), so that loading the state dict cannot overwrite them."""
    state = model.state_dict(keep_vars=True)
    chosen = {id(state[key]) for key in keys}
    return frozenset(key for key, tensor in state.items() if id(tensor) in chosen)


def describe_models() -> list[str]:
    """Human-readable lines: presets with their arguments, installed plugins, MONAI's classes."""
    from fedseg.model_args import format_model_args

    lines = [
        f"{name} (preset, MONAI {cls.__name__}): {format_model_args(args)}" for name, (cls, args) in PRESETS.items()
    ]
    for name, ep in sorted(plugin_entry_points(frozenset(PRESETS)).items()):
        try:
            factory = load_plugin(ep)
        except ModelError as err:
            lines.append(f"{name} ({plugin_source(ep)}): unusable: {err}")
            continue
        summary = (factory.__doc__ or "").strip().splitlines()
        lines.append(f"{name} ({plugin_source(ep)}, {ep.value})" + (f": {summary[0]}" if summary else ""))
    lines.append("bundle: the network of a MONAI bundle folder (run-config 'bundle')")
    lines.append(
        "any segmentation network of monai.networks.nets by class name, e.g. SegResNet, UNet, DynUNet, "
        "BasicUNet, AttentionUnet, VNet, UNETR, SwinUNETR (arguments: run-config 'model-args')"
    )
    return lines
