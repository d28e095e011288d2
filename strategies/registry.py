"""Strategy names → classes: built-ins, `flower:Class`, `module:Class`, and plugins of the
`fedseg.strategies` group.

Flower's own strategies (a built-in name such as `fedadam`, `flower:<Class>` for any class of
`flwr.serverapp.strategy`, or `module:Class` naming a Flower `Strategy` subclass) are wrapped by
`strategies.flower`: fedseg checks the replies, the Flower strategy aggregates them.

`build_strategy(config)` is what the ServerApp calls before any training: it finds the class,
checks the run config's `<strategy>.<parameter>` keys against the declared parameters and
builds the strategy — or raises ConfigError naming the key and listing the valid ones.
"""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from flwr.serverapp.strategy import Strategy as FlowerStrategy

from fedseg.config import STRATEGY_PARAM_SEPARATOR, ConfigError, RunConfig
from strategies.base import FedSegStrategy
from strategies.cyclic import Cyclic
from strategies.dice_weighted import DiceWeighted
from strategies.ditto import Ditto
from strategies.dp_distributed import DPDistributed
from strategies.dp_noised import DPNoised
from strategies.fedavg import FedAvg
from strategies.fedbn import FedBN
from strategies.fednova import FedNova
from strategies.fedper import FedPer
from strategies.fedprox import FedProx
from strategies.flower import NAMED as FLOWER_NAMED
from strategies.flower import find_flower_class, flower_catalog, wrap
from strategies.scaffold import Scaffold

ENTRY_POINT_GROUP = "fedseg.strategies"
FLOWER_PREFIX = "flower:"
BUILTIN: dict[str, type[FedSegStrategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        DiceWeighted,
        DPNoised,
        DPDistributed,
        Cyclic,
        Scaffold,
        FedNova,
        FedBN,
        FedPer,
        Ditto,
        *FLOWER_NAMED,
    )
}


def plugin_entry_points() -> dict[str, EntryPoint]:
    """Installed third-party strategies by entry-point name (a built-in name cannot be taken)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN}


def installed_names() -> list[str]:
    """Names selectable with `strategy = "<name>"`: built-ins first, then plugins."""
    return [*BUILTIN, *sorted(plugin_entry_points())]


def resolve(spec: str) -> type[FedSegStrategy]:
    """The strategy class for a built-in name, a plugin name, `flower:Class` or `module:Class`."""
    cls: object
    if spec.startswith(FLOWER_PREFIX):
        cls = wrap(find_flower_class(spec.removeprefix(FLOWER_PREFIX)), frozenset(BUILTIN))
    elif ":" in spec:
        cls = _import_class(spec)
        if isinstance(cls, type) and issubclass(cls, FlowerStrategy) and not issubclass(cls, FedSegStrategy):
            cls = wrap(cls, frozenset(BUILTIN))
    elif spec in BUILTIN:
        cls = BUILTIN[spec]
    elif spec in (plugins := plugin_entry_points()):
        cls = _load_plugin(plugins[spec])
    else:
        raise ConfigError(
            f"run-config 'strategy' is '{spec}'; installed strategies: {', '.join(installed_names())} "
            f"(or give '{FLOWER_PREFIX}<Flower strategy class>' or 'package.module:Class', or install a plugin "
            f"registering under '{ENTRY_POINT_GROUP}')"
        )
    if not (isinstance(cls, type) and issubclass(cls, FedSegStrategy)):
        raise ConfigError(
            f"strategy '{spec}' is {cls!r}, not a subclass of strategies.base.FedSegStrategy "
            "or flwr.serverapp.strategy.Strategy"
        )
    return cls


def build_strategy(config: RunConfig) -> FedSegStrategy:
    """Build the configured strategy with its checked parameters (fails before any round)."""
    cls = resolve(config.strategy)
    namespace = cls.strategy_name()
    if config.secure_aggregation and (reason := cls.secure_aggregation_reason()):
        raise ConfigError(f"strategy '{namespace}' cannot run with 'secure-aggregation': {reason}")
    namespaces = {*installed_names(), *flower_namespaces(), namespace}
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


def flower_namespaces() -> set[str]:
    """Parameter namespaces of Flower's other strategies (`flower:QFedAvg` → `qfedavg`), so their keys
    may stay in a run config that selects another strategy."""
    names = (class_name.lower() for class_name in flower_catalog())
    return {f"flower-{name}" if name in BUILTIN else name for name in names}


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
    except Exception as err:
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
        flower_class = getattr(BUILTIN.get(name), "flower_class", None)
        if flower_class is not None:
            source = f"built-in, Flower {flower_class.__name__}"
        try:
            cls = resolve(name)
        except ConfigError as err:
            lines.append(f"{name} ({source}): unusable: {err}")
            continue
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        lines.append(f"{name} ({source}): {summary}")
        lines.extend(f"    {name}.{p.name}  {p.describe()}" for p in cls.declared_params())
    catalog = flower_catalog()
    named = {cls.flower_class.__name__ for cls in FLOWER_NAMED}
    usable = [c for c, reason in catalog.items() if not reason and c not in named]
    lines.append(
        f"{FLOWER_PREFIX}<Class> (Flower's other strategies, parameters from their constructors): " + ", ".join(usable)
    )
    lines.extend(f"    {FLOWER_PREFIX}{c}: unusable: {reason}" for c, reason in catalog.items() if reason)
    return lines
