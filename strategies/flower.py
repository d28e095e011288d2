"""Flower's own strategies inside fedseg, by composition: fedseg checks, Flower aggregates.

`flower_strategy(FlowerClass, name)` makes a `FedSegStrategy` subclass that holds an instance
of the Flower strategy (`self.inner`) and

- forwards `configure_train` to it (after fedseg's bookkeeping), so it sees the global model it
  sends (FedOpt's `current_arrays`, FedAvgM's first model) and adds its own config (e.g. Flower's
  FedProx puts `proximal-mu`); the sampling minimums follow fedseg's live-site count;
- runs fedseg's reply checks (metrics, keys/shapes/dtypes, finite values, update norm ≤
  `max-update-ratio` × the global norm) and hands only the good replies to the inner strategy's
  `aggregate_train`, whose math builds the new model. Each reply goes in as a fresh message with
  its own ArrayRecord (Flower's robust strategies pop arrays from the records they get; integer
  buffers such as BatchNorm's `num_batches_tracked` go in as float64, since Flower's QFedAvg
  cannot scale integer arrays in place) and the metrics every good reply shares. The result gets
  the global model's dtypes back (float arrays cast, integer buffers rounded), so sites can load
  it; a Flower `AggregationError` leaves the model unchanged for that round, recorded in history;
- exposes the Flower constructor's arguments as typed, checked parameters
  (`strategies.flower_params`);
- checkpoints the inner strategy's attributes other than its constructor arguments (FedOpt's
  m_t and v_t, FedAvgM's momentum and model, ...) as tensors (`strategies.array_state`), so a
  resumed run continues exactly where the interrupted one stopped.

Built-in names: `fedadam`, `fedyogi`, `fedadagrad`, `fedavgm`, `fedtrimmedavg`, `fedmedian`,
`krum`. Any other Flower strategy: `strategy = "flower:<Class>"` (a class of
`flwr.serverapp.strategy`) or `"module:Class"` naming any `flwr.serverapp.strategy.Strategy`
subclass.
"""

from __future__ import annotations

import copy
import functools
import inspect
from collections.abc import Iterable, Mapping
from logging import WARNING
from typing import Any, ClassVar

import flwr.serverapp.strategy as flower
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies

from fedseg.config import ConfigError
from fedseg.flower_compat import message_with_metadata
from strategies import array_state
from strategies.aggregate import array_view, is_float
from strategies.base import FedSegStrategy, Reply
from strategies.fedprox import refuse_with_dp_sgd
from strategies.flower_params import (
    SAMPLING_ARGS,
    constructor_arguments,
    constructor_params,
    fedseg_arguments,
    missing_required,
    unsupported_reason,
)
from strategies.params import Param

# Flower strategies that take part in fedseg's segmentation rounds only in name.
INCOMPATIBLE = {
    "FedXgbBagging": "it aggregates XGBoost models (bytes), not the model's tensors",
    "FedXgbCyclic": "it aggregates XGBoost models (bytes), not the model's tensors",
}
# Flower strategies whose new model is a function of the examples-weighted mean of the replies (FedAvg,
# then a server optimizer or momentum on it): they compose with secure aggregation.
MEAN_BASED = frozenset({"FedAvg", "FedProx", "FedAdam", "FedYogi", "FedAdagrad", "FedAvgM"})
_POSITIVE = 1e-12  # smallest allowed value of a parameter that must be > 0
_BELOW_ONE = 0.999999  # largest allowed value of a decay rate that must be < 1


class FlowerStrategy(FedSegStrategy):
    """fedseg's checks, state and reports around a Flower strategy that does the aggregation."""

    flower_class: ClassVar[type[flower.Strategy]]
    inner: flower.Strategy

    def __init__(self, min_sites: int = 2, site_learning_rate: float | None = None, **params: Any) -> None:
        super().__init__(min_sites, **params)
        own = {p.name: getattr(self, p.attribute) for p in self.flower_params()}
        missing = missing_required(self.flower_params(), own, self.flower_class)
        if missing:
            keys = ", ".join(f"'{self.strategy_name()}.{name}'" for name in missing)
            raise ConfigError(f"strategy '{self.strategy_name()}' needs run-config {keys}")
        arguments = {name.replace("-", "_"): value for name, value in own.items() if value is not None}
        self.inner = self.flower_class(
            **arguments, **fedseg_arguments(self.flower_class, min_sites, site_learning_rate)
        )
        self._config_arguments = {a.name for a in constructor_arguments(self.flower_class)}
        self._error = ""

    @classmethod
    def from_config(cls, config: Any, values: Mapping[str, Any]) -> FedSegStrategy:
        strategy = cls(min_sites=config.min_sites, site_learning_rate=config.learning_rate, **values)
        refuse_with_dp_sgd(config, cls.strategy_name(), getattr(strategy, "proximal_mu", 0.0) or 0.0)
        return strategy

    @classmethod
    def flower_params(cls) -> tuple[Param, ...]:
        """The parameters handed to the Flower constructor (all but fedseg's own)."""
        own = {p.name for p in FedSegStrategy.declared_params()}
        return tuple(p for p in cls.declared_params() if p.name not in own)

    @classmethod
    def secure_aggregation_reason(cls) -> str:
        if cls.flower_class.__name__ in MEAN_BASED:
            return ""
        return (
            f"Flower's {cls.flower_class.__name__} does not aggregate the examples-weighted mean of the replies "
            "(robust, per-site or loss-weighted rules need each site's update)"
        )

    # ------------------------------------------------------------------ composition
    def train_instructions(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        for name in SAMPLING_ARGS:  # fedseg's federation lowers the minimums to the live sites
            if hasattr(self.inner, name):
                setattr(self.inner, name, getattr(self, name))
        self._error = ""
        return self.inner.configure_train(server_round, arrays, config, grid)

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        shared = [key for key in replies[0].metrics if all(key in r.metrics for r in replies)]
        try:
            arrays, _ = self.inner.aggregate_train(server_round, [_inner_message(r, shared) for r in replies])
        except (AggregationError, InconsistentMessageReplies) as err:
            arrays, self._error = None, f"{type(err).__name__}: {err}"
        if arrays is None:
            self._error = self._error or "the Flower strategy returned no model"
            log(WARNING, "[fedseg] %s: %s; the global model is unchanged", self.strategy_name(), self._error)
            return self.global_arrays
        return like_global(arrays, self.global_arrays, self.strategy_name())

    # ------------------------------------------------------------------ state and reports
    def state_dict(self) -> dict[str, Any]:
        """The inner strategy's attributes that are no constructor argument (those come from the run config)."""
        state = {
            name: value
            for name, value in vars(self.inner).items()
            if name not in self._config_arguments and not callable(value)
        }
        return {
            "flower": {
                name: array_state.encode(value, f"{self.strategy_name()}.{name}") for name, value in state.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        unknown = sorted(set(state) - {"flower"})
        if unknown:
            raise ValueError(f"strategy '{self.strategy_name()}': unexpected state keys {unknown}")
        for name, value in state.get("flower", {}).items():
            setattr(self.inner, name, array_state.decode(value))

    def round_report(self, server_round: int) -> dict[str, Any]:
        report = super().round_report(server_round)
        return {**report, "aggregation-error": self._error} if self._error else report


def flower_strategy(
    flower_class: type, name: str, limits: Mapping[str, Mapping[str, float]] | None = None
) -> type[FlowerStrategy]:
    """A `FlowerStrategy` subclass for `flower_class` named `name`; ConfigError if it cannot compose."""
    reason = INCOMPATIBLE.get(flower_class.__name__) or unsupported_reason(flower_class)
    if not (isinstance(flower_class, type) and issubclass(flower_class, flower.Strategy)):
        reason = "it is not a subclass of flwr.serverapp.strategy.Strategy"
    elif inspect.isabstract(flower_class):
        reason = "it is abstract"
    if reason:
        raise ConfigError(f"Flower strategy {flower_class.__name__} cannot be used in fedseg: {reason}")
    params = constructor_params(flower_class, limits)
    clashes = [p.name for p in params if hasattr(FlowerStrategy, p.attribute)]
    if clashes:
        raise ConfigError(
            f"Flower strategy {flower_class.__name__}: arguments {clashes} clash with fedseg's attributes"
        )
    summary = (inspect.getdoc(flower_class) or flower_class.__name__).splitlines()[0]
    return type(
        flower_class.__name__,
        (FlowerStrategy,),
        {
            "__doc__": f"Flower's {flower_class.__name__}, with fedseg's reply checks: {summary}",
            "__module__": __name__,
            "name": name,
            "params": params,
            "flower_class": flower_class,
        },
    )


def like_global(arrays: ArrayRecord, global_arrays: ArrayRecord, strategy: str) -> ArrayRecord:
    """`arrays` in the global model's key order and dtypes (integer targets rounded)."""
    if set(arrays) != set(global_arrays):
        raise ValueError(f"strategy '{strategy}' returned keys {sorted(arrays)}, the model has {sorted(global_arrays)}")
    out = {}
    for key, reference in global_arrays.items():
        target, value = array_view(reference), arrays[key].numpy()
        if value.shape != target.shape:
            raise ValueError(
                f"strategy '{strategy}' returned '{key}' with shape {value.shape}, the model's is {target.shape}"
            )
        if value.dtype != target.dtype:
            value = (value if is_float(target) or not is_float(value) else np.rint(value)).astype(target.dtype)
        out[key] = Array(np.ascontiguousarray(value))
    return ArrayRecord(out)


def _inner_message(reply: Reply, metric_keys: list[str]) -> Message:
    """The reply as the inner strategy gets it: its own ArrayRecord (integer buffers as float64, which
    every Flower strategy's arithmetic accepts), the metrics all good replies share."""
    message = reply.message
    assert message is not None  # replies passed on to a Flower strategy keep their message
    content = message.content
    (array_key,), (metric_key,) = content.array_records, content.metric_records
    arrays = {
        key: array if is_float(reply.views[key]) else Array(reply.views[key].astype(np.float64))
        for key, array in reply.arrays.items()
    }
    record = RecordDict(
        {array_key: ArrayRecord(arrays), metric_key: MetricRecord({key: reply.metrics[key] for key in metric_keys})}
    )
    return message_with_metadata(record, copy.copy(message.metadata))


# ---------------------------------------------------------------------- built-in names
_ADAPTIVE_LIMITS = {  # FedAdam and FedYogi: server step, moment decays, adaptivity floor
    "eta": {"minimum": 0.0},
    "beta-1": {"minimum": 0.0, "maximum": _BELOW_ONE},
    "beta-2": {"minimum": 0.0, "maximum": _BELOW_ONE},
    "tau": {"minimum": _POSITIVE},
}
FedAdam = flower_strategy(
    flower.FedAdam,
    "fedadam",
    _ADAPTIVE_LIMITS,
)
FedYogi = flower_strategy(
    flower.FedYogi,
    "fedyogi",
    _ADAPTIVE_LIMITS,
)
FedAdagrad = flower_strategy(flower.FedAdagrad, "fedadagrad", {"eta": {"minimum": 0.0}, "tau": {"minimum": _POSITIVE}})
FedAvgM = flower_strategy(
    flower.FedAvgM,
    "fedavgm",
    {"server-learning-rate": {"minimum": 0.0}, "server-momentum": {"minimum": 0.0, "maximum": 1.0}},
)
FedTrimmedAvg = flower_strategy(flower.FedTrimmedAvg, "fedtrimmedavg", {"beta": {"minimum": 0.0, "maximum": 0.49}})
FedMedian = flower_strategy(flower.FedMedian, "fedmedian")
Krum = flower_strategy(flower.Krum, "krum", {"num-malicious-nodes": {"minimum": 0}})
NAMED = (FedAdam, FedYogi, FedAdagrad, FedAvgM, FedTrimmedAvg, FedMedian, Krum)


@functools.cache
def wrap(flower_class: type, taken: frozenset[str] = frozenset()) -> type[FlowerStrategy]:
    """The fedseg strategy for a Flower class: its built-in name if it has one, else a class named
    after it in lower case (`flower-<name>` when a fedseg strategy has that name: `flower-fedavg`)."""
    for named in NAMED:
        if named.flower_class is flower_class:
            return named
    name = flower_class.__name__.lower()
    return flower_strategy(flower_class, f"flower-{name}" if name in taken else name)


def find_flower_class(class_name: str) -> type:
    """`flwr.serverapp.strategy.<class_name>`; ConfigError listing Flower's strategies if there is none."""
    found = getattr(flower, class_name, None)
    if not (isinstance(found, type) and issubclass(found, flower.Strategy)):
        raise ConfigError(f"Flower has no strategy '{class_name}'; its strategies: {', '.join(flower_catalog())}")
    return found


def flower_catalog() -> dict[str, str]:
    """Every strategy class of `flwr.serverapp.strategy` → "" if fedseg can use it, else why not."""
    catalog = {}
    for class_name in sorted(flower.__all__):
        found = getattr(flower, class_name)
        if isinstance(found, type) and issubclass(found, flower.Strategy) and not inspect.isabstract(found):
            catalog[class_name] = INCOMPATIBLE.get(class_name) or unsupported_reason(found)
    return catalog
