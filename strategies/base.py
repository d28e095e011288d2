"""The shared base of fedseg strategies: declared parameters, reply checks, lean aggregation, state.

Contract for every strategy (built-in or plugin), all on top of Flower's message-based FedAvg:

- `name` (run-config name and parameter namespace) and `params` (typed `Param`s). Values come
  from run-config keys `<name>.<param>` and are checked before the first round; each becomes an
  attribute (`proximal-mu` → `self.proximal_mu`).
- `aggregate_train` checks every reply (`check_train_reply`) and drops a bad one with a logged
  reason — never averages it — then calls `combine(server_round, replies)` on the good ones.
  Override `check_reply` (an extra check), `site_weights` (who counts how much) or `combine`
  (how the model is built).
- `state_dict()` → a JSON-serialisable dict (str keys; int, float, str, bool, lists, dicts) of
  everything the strategy must remember across rounds (e.g. a privacy accountant, a cyclic
  position). A resumed run builds the strategy from the same run config, calls
  `load_state_dict(state)` once, then continues with the next round. Default: stateless.
- `round_report(server_round)` → a JSON-serialisable dict stored in history.json under the
  round's "strategy" key (default: the replies dropped in that round, with their reasons).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedseg.config import RunConfig
from strategies.aggregate import Scratch, array_view, is_float, squared_distance, weighted_sum
from strategies.params import Param, resolve_params

NUM_EXAMPLES = "num-examples"


@dataclass(frozen=True)
class Reply:
    """A reply that passed the checks: its arrays, metrics, site name and update norm."""

    arrays: ArrayRecord
    metrics: MetricRecord
    site: str
    update_norm: float


class FedSegStrategy(FlowerFedAvg):
    """FedAvg-shaped base: samples every site, checks replies, averages weighted by `site_weights`."""

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = (
        Param("max-update-ratio", float, 100.0,
              "drop a reply whose update norm exceeds this many times the global model's norm (0: off)",
              minimum=0.0),
    )
    required_metrics: ClassVar[tuple[str, ...]] = (NUM_EXAMPLES,)
    max_update_ratio: float

    def __init__(self, min_sites: int = 2, **params: Any) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=min_sites,
            min_evaluate_nodes=min_sites,
            min_available_nodes=min_sites,
        )
        values = {key.replace("_", "-"): value for key, value in params.items()}
        for key, value in resolve_params(self.strategy_name(), self.declared_params(), values).items():
            setattr(self, key.replace("-", "_"), value)
        self._global: ArrayRecord | None = None
        self._dropped: list[dict[str, str]] = []

    @classmethod
    def strategy_name(cls) -> str:
        """Run-config name and parameter namespace (the class name in lower case if unset)."""
        return cls.name or cls.__name__.lower()

    @classmethod
    def declared_params(cls) -> tuple[Param, ...]:
        """Parameters of this class and its bases, base first; a subclass may redeclare a name."""
        merged: dict[str, Param] = {}
        for klass in reversed(cls.__mro__):
            for param in vars(klass).get("params", ()):
                merged[param.name] = param
        return tuple(merged.values())

    @classmethod
    def from_config(cls, config: RunConfig, values: Mapping[str, Any]) -> FedSegStrategy:
        """Build from the run config and this strategy's parameter values (hyphenated names)."""
        return cls(min_sites=config.min_sites, **values)

    # ------------------------------------------------------------------ hooks for subclasses
    def site_weights(self, replies: list[Reply]) -> list[float]:
        """Relative weight of each good reply (default: its training examples, as FedAvg)."""
        return [float(reply.metrics[NUM_EXAMPLES]) for reply in replies]

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        """The new global model from the good replies (default: average weighted by `site_weights`)."""
        weights = self.site_weights(replies)
        total = sum(weights)
        return weighted_sum(self.global_arrays, [r.arrays for r in replies], [w / total for w in weights])

    def check_reply(self, reply: Reply) -> str:
        """Extra check of a reply that passed the shared ones: "" to keep it, else the reason to drop it."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state to checkpoint (default: none)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what `state_dict` returned (default: accepts only the empty state)."""
        if state:
            raise ValueError(f"strategy '{self.strategy_name()}' keeps no state, got keys {sorted(state)}")

    def round_report(self, server_round: int) -> dict[str, Any]:
        """Entries for this round's record in history.json (default: dropped replies)."""
        return {"dropped-replies": list(self._dropped)}

    # ------------------------------------------------------------------ Flower strategy hooks
    @property
    def global_arrays(self) -> ArrayRecord:
        """The global model sent out by the last `configure_train`."""
        if self._global is None:
            raise RuntimeError("configure_train must run before aggregate_train")
        return self._global

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember the global model (replies are checked against it), then sample every site."""
        self._global = arrays
        self._dropped = []
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, drop bad ones with a logged reason, combine the rest."""
        scratch = Scratch()
        reference = _reference(self.global_arrays, scratch)
        good = []
        for message in replies:
            if message.has_error():
                continue
            reply, reason = check_train_reply(
                message.content, reference, self.required_metrics, self.max_update_ratio, scratch
            )
            reason = reason if reply is None else self.check_reply(reply)
            if reason:
                self._drop(message, "train", reason)
            else:
                good.append(reply)
        if not good:
            return None, None
        log(INFO, "[fedseg] %s: aggregating %d site(s) in round %d", self.strategy_name(), len(good), server_round)
        arrays = self.combine(server_round, good)
        return arrays, aggregate_metricrecords([_as_record(r.metrics) for r in good], NUM_EXAMPLES)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Weighted mean of the evaluation metrics of the replies that pass the metric checks."""
        good = []
        for message in replies:
            if message.has_error():
                continue
            metrics, reason = check_metrics(message.content, (NUM_EXAMPLES,))
            if metrics is None:
                self._drop(message, "evaluate", reason)
            else:
                good.append(_as_record(metrics))
        return aggregate_metricrecords(good, NUM_EXAMPLES) if good else None

    def _drop(self, message: Message, stage: str, reason: str) -> None:
        site = site_name(message)
        self._dropped.append({"site": site, "stage": stage, "reason": reason})
        log(WARNING, "[fedseg] %s: %s reply dropped: %s", site, stage, reason)


def strategy_round_report(strategy: object, server_round: int) -> dict[str, Any]:
    """`strategy.round_report(server_round)` when it has one (Flower's own strategies do not)."""
    report = getattr(strategy, "round_report", None)
    return dict(report(server_round)) if callable(report) else {}


# ---------------------------------------------------------------------- shared reply checks
@dataclass(frozen=True)
class _Reference:
    arrays: ArrayRecord
    specs: dict[str, tuple[tuple[int, ...], str]]
    norm: float


def _reference(arrays: ArrayRecord, scratch: Scratch) -> _Reference:
    views = {key: array_view(array) for key, array in arrays.items()}
    norm = math.sqrt(sum(squared_distance(v, 0.0, scratch) for v in views.values() if is_float(v)))
    return _Reference(arrays, {k: (v.shape, str(v.dtype)) for k, v in views.items()}, norm)


def check_metrics(content: RecordDict, required: Iterable[str]) -> tuple[MetricRecord | None, str]:
    """The reply's single MetricRecord if it holds every required key as a finite number."""
    if len(content.metric_records) != 1:
        return None, f"expected one MetricRecord, got {len(content.metric_records)}"
    metrics = next(iter(content.metric_records.values()))
    for key in required:
        value = metrics.get(key)
        if value is None:
            return None, f"metric '{key}' missing"
        if isinstance(value, list) or not math.isfinite(value):
            return None, f"metric '{key}' is not a finite number: {value!r}"
    if metrics[NUM_EXAMPLES] <= 0:
        return None, f"metric '{NUM_EXAMPLES}' must be > 0, got {metrics[NUM_EXAMPLES]!r}"
    return metrics, ""


def check_train_reply(
    content: RecordDict,
    reference: _Reference,
    required: Iterable[str],
    max_update_ratio: float,
    scratch: Scratch | None = None,
) -> tuple[Reply | None, str]:
    """A `Reply` if the content matches the global model (keys, shapes, dtypes), is finite and
    its update norm is not absurd; otherwise None and the reason."""
    metrics, reason = check_metrics(content, required)
    if metrics is None:
        return None, reason
    if len(content.array_records) != 1:
        return None, f"expected one ArrayRecord, got {len(content.array_records)}"
    arrays = next(iter(content.array_records.values()))
    if set(arrays) != set(reference.specs):
        missing, extra = sorted(set(reference.specs) - set(arrays)), sorted(set(arrays) - set(reference.specs))
        return None, f"array keys differ from the global model (missing {missing}, unexpected {extra})"
    squared = 0.0
    for key, (shape, dtype) in reference.specs.items():
        try:
            view = array_view(arrays[key])
        except ValueError as err:
            return None, f"array '{key}' is malformed: {err}"
        if view.shape != shape or str(view.dtype) != dtype:
            return None, f"array '{key}' is {view.dtype}{list(view.shape)}, the global model has {dtype}{list(shape)}"
        if is_float(view):
            distance = squared_distance(view, array_view(reference.arrays[key]), scratch)
            if not math.isfinite(distance) and not np.isfinite(view).all():
                return None, f"array '{key}' holds non-finite values"
            squared += distance
    norm = math.sqrt(squared)
    if max_update_ratio and norm > max_update_ratio * max(reference.norm, 1.0):
        return None, (f"update norm {norm:.3g} exceeds {max_update_ratio:g} × the global model's norm "
                      f"{reference.norm:.3g}")
    return Reply(arrays, metrics, site_name_from(metrics), norm), ""


def site_name(message: Message) -> str:
    """`site-<site-id>` from the reply's metrics when present, else `node-<node id>` (as in history)."""
    if not message.has_error() and len(message.content.metric_records) == 1:
        name = site_name_from(next(iter(message.content.metric_records.values())))
        if name:
            return name
    return f"node-{message.metadata.src_node_id}"


def site_name_from(metrics: MetricRecord) -> str:
    value = metrics.get("site-id")
    return f"site-{int(value)}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def _as_record(metrics: MetricRecord) -> RecordDict:
    return RecordDict({"metrics": metrics})
