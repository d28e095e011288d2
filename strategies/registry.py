"""Strategy names → classes: built-ins, `module:Class`, and plugins of the `fedseg.strategies` group.

`build_strategy(config)` is what the ServerApp calls before any training: it finds the class,
checks the run config's `<strategy>.<parameter>` keys against the declared parameters and
builds the strategy — or raises ConfigError naming the key and listing the valid ones.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from fedseg.config import STRATEGY_PARAM_SEPARATOR, ConfigError, RunConfig
from strategies.base import FedSegStrategy
from strategies.cyclic import Cyclic
from strategies.dice_weighted import DiceWeighted
from strategies.dp_noised import DPNoised
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx

ENTRY_POINT_GROUP = "fedseg.strategies"
BUILTIN: dict[str, type[FedSegStrategy]] = {
    cls.name: cls for cls in (FedAvg, FedProx, DiceWeighted, DPNoised, Cyclic)
}


def plugin_entry_points() -> dict[str, EntryPoint]:
    """Installed third-party strategies by entry-point name (a built-in name cannot be taken)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


def installed_names() -> list[str]:
    """Names selectable with `strategy = "<name>"`: built-ins first, then plugins."""
    return [*BUILTIN, *sorted(plugin_entry_points())]


def resolve(spec: str) -> type[FedSegStrategy]:
    """The strategy class for a built-in name, a plugin name or `module:Class`."""
    if ":" in spec:
        cls = _import_class(spec)
    elif spec in BUILTIN:
        cls = BUILTIN[spec]
    elif spec in (plugins := plugin_entry_points()):
        cls = _load_plugin(plugins[spec])
    else:
        raise ConfigError(
            f"run-config 'strategy' is '{spec}'; installed strategies: {', '.join(installed_names())} "
            f"(or give 'package.module:Class', or install a plugin registering under '{ENTRY_POINT_GROUP}')"
        )
    if not (isinstance(cls, type) and issubclass(cls, FedSegStrategy)):
        raise ConfigError(f"strategy '{spec}' is {cls!r}, not a subclass of strategies.base.FedSegStrategy")
    return cls


def build_strategy(config: RunConfig) -> FedSegStrategy:
    """Build the configured strategy with its checked parameters (fails before any round)."""
    cls = resolve(config.strategy)
    namespace = cls.strategy_name()
    namespaces = {*installed_names(), namespace}
    values = {}
    for key, value in config.strategy_params.items():
        owner, _, param = key.partition(STRATEGY_PARAM_SEPARATOR)
        if owner == namespace:
            values[param] = value
        elif owner not in namespaces:
            raise ConfigError(
                f"run-config key '{key}': '{owner}' is no installed strategy; parameter keys are "
                f"'<strategy>.<parameter>' with strategy one of: {', '.join(sorted(namespaces))}"
            )
    return cls.from_config(config, values)


def _import_class(spec: str) -> object:
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"run-config 'strategy' is '{spec}': cannot import '{module_name}': {err}") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(f"run-config 'strategy' is '{spec}': module '{module_name}' has no '{class_name}'") from None


def _load_plugin(ep: EntryPoint) -> object:
    try:
        cls = ep.load()
    except Exception as err:  # noqa: BLE001 - a broken plugin must say which one it is
        raise ConfigError(f"strategy plugin '{ep.name}' ({ep.value}) failed to load: {err}") from err
    name = getattr(cls, "strategy_name", lambda: ep.name)()
    if name != ep.name:
        raise ConfigError(f"strategy plugin '{ep.name}' ({ep.value}) declares name '{name}'; they must match")
    return cls


def describe_installed() -> list[str]:
    """Human-readable lines: every installed strategy, where it comes from, and its parameters."""
    lines = []
    for name in installed_names():
        source = "built-in" if name in BUILTIN else f"plugin {plugin_entry_points()[name].value}"
        try:
            cls = resolve(name)
        except ConfigError as err:
            lines.append(f"{name} ({source}): unusable: {err}")
            continue
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name} ({source}): {summary}")
        lines.extend(f"    {name}.{p.name}  {p.describe()}" for p in cls.declared_params())
    return lines
