"""Typed strategy parameters: each strategy declares them; run-config values are checked against them.

A strategy's parameters live in the run config under the strategy's name:
`fedprox.proximal-mu = 0.1` (pyproject or a TOML run config) or
`--run-config "fedprox.proximal-mu=0.1"` (Flower turns the dotted key into the same flat key).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedseg.config import ConfigError

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


@dataclass(frozen=True)
class Param:
    """One strategy parameter: hyphenated name, type, default, help and allowed range or choices."""

    name: str
    type: type
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()

    @property
    def attribute(self) -> str:
        """Python attribute name on the strategy (hyphens become underscores)."""
        return self.name.replace("-", "_")

    def describe(self) -> str:
        """One line: type, default, allowed values and help."""
        allowed = ""
        if self.choices:
            allowed = f", one of {'|'.join(self.choices)}"
        elif self.minimum is not None or self.maximum is not None:
            low = "-inf" if self.minimum is None else f"{self.minimum:g}"
            high = "inf" if self.maximum is None else f"{self.maximum:g}"
            allowed = f", in [{low}, {high}]"
        return f"{self.type.__name__}, default {self.default!r}{allowed}: {self.help}"

    def coerce(self, value: Any) -> Any:
        """The value converted to this parameter's type, or ValueError saying what is allowed."""
        typed = _typed(value, self.type)
        if typed is None:
            raise ValueError(f"must be {_TYPE_NAMES[self.type]}, got {value!r}")
        if self.choices and typed not in self.choices:
            raise ValueError(f"must be one of {', '.join(self.choices)}, got {value!r}")
        if self.minimum is not None and typed < self.minimum:
            raise ValueError(f"must be >= {self.minimum:g}, got {value!r}")
        if self.maximum is not None and typed > self.maximum:
            raise ValueError(f"must be <= {self.maximum:g}, got {value!r}")
        return typed


def resolve_params(strategy: str, params: Iterable[Param], values: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults overridden by `values` (hyphenated names), each checked; ConfigError lists valid ones."""
    declared = {p.name: p for p in params}
    unknown = sorted(set(values) - set(declared))
    if unknown:
        raise ConfigError(
            f"strategy '{strategy}' has no parameter {', '.join(repr(f'{strategy}.{k}') for k in unknown)}; "
            f"valid parameters: {_listing(strategy, declared.values())}"
        )
    resolved = {}
    for name, param in declared.items():
        try:
            resolved[name] = param.coerce(values[name]) if name in values else param.default
        except ValueError as err:
            raise ConfigError(
                f"run-config '{strategy}.{name}' {err}; valid parameters: {_listing(strategy, declared.values())}"
            ) from None
    return resolved


def _listing(strategy: str, params: Iterable[Param]) -> str:
    items = [f"{strategy}.{p.name} ({p.describe()})" for p in params]
    return "; ".join(items) if items else "(none)"


def _typed(value: Any, kind: type) -> Any:
    """`value` as `kind` when it is one (ints count as floats, integral floats as ints), else None."""
    if kind is bool:
        return value if isinstance(value, bool) else None
    if isinstance(value, bool):
        return None
    if kind is int:
        if isinstance(value, int):
            return value
        return int(value) if isinstance(value, float) and value.is_integer() else None
    if kind is float:
        return float(value) if isinstance(value, (int, float)) else None
    return value if isinstance(value, kind) else None
