"""A Flower strategy's constructor as fedseg: typed `Param`s for its own arguments, fedseg's values
for the rest.

Every keyword argument of the constructor becomes a run-config parameter (`beta_1` → `beta-1`),
typed from its annotation (else its default: `bool`, `int`, `float` or `str`), with the Flower
default and the first sentence of its entry in the class's docstring as help — except the
arguments fedseg sets itself:

- sampling and record layout (`fraction_*` = 1, `min_*_nodes` = min-sites, `weighted_by_key` =
  "num-examples", the record keys, the metric aggregation functions): fedseg samples every live
  site and checks the replies itself;
- the sites' learning rate (`eta_l`, `client_learning_rate`) = run-config `learning-rate`, and
  the training-loss metric (`train_loss_key`) = "train-loss", as the fedseg ClientApp reports it.

An argument that a run config cannot express (a callable, a strategy) keeps its Flower default;
one without a default makes the class unusable from a run config (`unsupported_reason`). An
argument without a default but of a plain type is a required parameter (its `Param` default is
None; `missing_required` names it).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Mapping
from typing import Any

from strategies.params import Param

SCALARS = (bool, int, float, str)
SAMPLING_ARGS = ("fraction_train", "fraction_evaluate", "min_train_nodes", "min_evaluate_nodes", "min_available_nodes")
RECORD_ARGS = (
    "weighted_by_key",
    "arrayrecord_key",
    "configrecord_key",
    "train_metrics_aggr_fn",
    "evaluate_metrics_aggr_fn",
)
SITE_LEARNING_RATE_ARGS = ("eta_l", "client_learning_rate")
TRAIN_LOSS_KEY = "train-loss"  # the fedseg ClientApp's training-loss metric
OWNED_BY_FEDSEG = frozenset({*SAMPLING_ARGS, *RECORD_ARGS, *SITE_LEARNING_RATE_ARGS, "train_loss_key"})


def constructor_arguments(flower_class: type[Any]) -> list[inspect.Parameter]:
    """The constructor's named arguments (no `self`, `*args`, `**kwargs`)."""
    parameters = list(inspect.signature(flower_class.__init__).parameters.values())[1:]
    return [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def scalar_type(flower_class: type[Any], argument: inspect.Parameter) -> type | None:
    """`bool`, `int`, `float` or `str` from the annotation (`X | None` counts as X), else from the default."""
    try:
        hint = typing.get_type_hints(flower_class.__init__).get(argument.name)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to the default's type
        hint = None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        members = [h for h in typing.get_args(hint) if h is not type(None)]
        hint = members[0] if len(members) == 1 else None
    if hint in SCALARS:
        return hint
    default = argument.default
    return type(default) if type(default) in SCALARS else None


def unsupported_reason(flower_class: type) -> str:
    """Why a run config cannot build this class ("" when it can): a required argument it cannot express."""
    for argument in constructor_arguments(flower_class):
        if argument.name in OWNED_BY_FEDSEG or argument.default is not inspect.Parameter.empty:
            continue
        if scalar_type(flower_class, argument) is None:
            hint = argument.annotation if argument.annotation is not inspect.Parameter.empty else "an object"
            return f"its argument '{argument.name}' ({getattr(hint, '__name__', hint)}) cannot come from a run config"
    return ""


def constructor_params(
    flower_class: type, limits: Mapping[str, Mapping[str, float]] | None = None
) -> tuple[Param, ...]:
    """A `Param` per constructor argument a run config can set; `limits` adds ranges by hyphenated name."""
    docs = _argument_docs(flower_class)
    params = []
    for argument in constructor_arguments(flower_class):
        kind = scalar_type(flower_class, argument)
        if argument.name in OWNED_BY_FEDSEG or kind is None:
            continue
        name = argument.name.replace("_", "-")
        required = argument.default is inspect.Parameter.empty
        default = None if required or argument.default is None else kind(argument.default)
        help_text = docs.get(argument.name, f"Flower's `{argument.name}`") + (" (required)" if required else "")
        limit = (limits or {}).get(name, {})
        params.append(Param(name, kind, default, help_text, limit.get("minimum"), limit.get("maximum")))
    return tuple(params)


def fedseg_arguments(flower_class: type, min_sites: int, site_learning_rate: float | None) -> dict[str, Any]:
    """The constructor arguments fedseg sets (only those the class takes)."""
    values: dict[str, Any] = {
        "fraction_train": 1.0,
        "fraction_evaluate": 1.0,
        "weighted_by_key": "num-examples",
        "train_loss_key": TRAIN_LOSS_KEY,
    }
    values.update({name: min_sites for name in SAMPLING_ARGS if name.startswith("min_")})
    if site_learning_rate is not None:
        values.update({name: site_learning_rate for name in SITE_LEARNING_RATE_ARGS})
    accepted = {argument.name for argument in constructor_arguments(flower_class)}
    return {name: value for name, value in values.items() if name in accepted}


def missing_required(params: tuple[Param, ...], values: Mapping[str, Any], flower_class: type) -> list[str]:
    """Hyphenated names of required arguments left unset (None) in the resolved `values`."""
    required = {
        a.name.replace("_", "-") for a in constructor_arguments(flower_class) if a.default is inspect.Parameter.empty
    }
    return [p.name for p in params if p.name in required and values.get(p.name) is None]


def _argument_docs(flower_class: type) -> dict[str, str]:
    """First sentence of each argument's entry in the numpydoc "Parameters" section."""
    docs = {}
    for match in re.finditer(
        r"^(\w+)\s*:[^\n]*\n((?:[ \t]+\S[^\n]*\n?)+)", inspect.getdoc(flower_class) or "", re.MULTILINE
    ):
        text = " ".join(match.group(2).split())
        docs[match.group(1)] = re.split(r"(?<=\.)\s", text, maxsplit=1)[0].rstrip(".")
    return docs
