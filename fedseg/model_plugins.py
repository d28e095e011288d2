"""Custom networks from installed packages: the `fedseg.models` entry-point group.

A package registers a network under a name, e.g. in its pyproject:

    [project.entry-points."fedseg.models"]
    light-unet = "fedseg_light_unet:LightUNet"

The object it names is a class or function taking the keyword arguments `in_channels` and
`out_channels` (fedseg sets them from `in-channels` and the label scheme), `spatial_dims` if it has
that argument (fedseg sets 3), and any `model-args`; it returns an `nn.Module` mapping
`(batch, in_channels, D, H, W)` to `(batch, out_channels, D, H, W)` logits. `model = "light-unet"`
selects it; `fedseg models` lists the installed ones.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points

from torch import nn

ENTRY_POINT_GROUP = "fedseg.models"

NetworkFactory = Callable[..., nn.Module]


class ModelError(ValueError):
    """A network name or its arguments do not describe a network fedseg can build (also: a broken plugin)."""


def plugin_entry_points(reserved: frozenset[str] = frozenset()) -> dict[str, EntryPoint]:
    """Installed network plugins by name (a `reserved` name, e.g. a preset's, cannot be taken)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in reserved}


def load_plugin(ep: EntryPoint) -> NetworkFactory:
    """The plugin's network class or function; ModelError naming the entry point otherwise."""
    try:
        factory = ep.load()
    except Exception as err:  # noqa: BLE001 - a broken third-party package: one line naming it
        raise ModelError(
            f"network plugin '{ep.name}' ({ep.value}) failed to load: {type(err).__name__}: {err}"
        ) from None
    if not callable(factory):
        raise ModelError(f"network plugin '{ep.name}' ({ep.value}) is {factory!r}, not a class or function")
    return factory


def plugin_source(ep: EntryPoint) -> str:
    """Where a plugin comes from, for model files and listings: `plugin <distribution> <version>`."""
    dist = ep.dist
    return f"plugin {dist.name} {dist.version}" if dist is not None else f"plugin {ep.value}"
