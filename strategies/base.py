"""The shared base of fedseg strategies: declared parameters, reply checks, lean aggregation, state.

Contract for every strategy (built-in or plugin), all on top of Flower's message-based FedAvg:

- `name` (run-config name and parameter namespace) and `params` (typed `Param`s). Values come
  from run-config keys `<name>.<param>` and are checked before the first round; each becomes an
  attribute (`proximal-mu` → `self.proximal_mu`).
- `aggregate_train` checks every reply (`check_train_content`, then update norms and finite
  values in one pass over the arrays, then `check_reply`) and drops a bad one with a logged
  reason — never averages it — then calls `combine(server_round, replies)` on the good ones.
  Override `check_reply` (an extra check), `site_weights` (who counts how much, from the replies'
  metrics only) or `combine` (how the model is built).
- Speed: each reply's arrays are read once by the checks. While `combine` is not overridden, that
  pass also accumulates the weighted mean, and bounds each update norm ‖x − g‖ by ‖x‖ ± ‖g‖
  (a reply near the `max-update-ratio` limit gets its exact norm; `Reply.update_norm` is then
  measured on first use); the mean is recomputed if a reply is dropped afterwards. With an
  overridden `combine`, the checks measure every exact update norm for it.
- `state_dict()` → a dict (str keys; int, float, str, bool, lists, dicts, and torch tensors for
  array state such as a server optimizer's moments) of everything the strategy must remember
  across rounds (e.g. a privacy accountant, a cyclic position). It is stored in checkpoint.pt
  (read back with `torch.load(weights_only=True)`). A resumed run builds the strategy from the
  same run config, calls `load_state_dict(state)` once, then continues with the next round.
  Default: stateless.
- `round_report(server_round)` → a JSON-serialisable dict stored in history.json under the
  round's "strategy" key (default: the replies dropped in that round, with their reasons).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from logging import INFO, WARNING
from typing import Any, ClassVar

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from fedseg.config import ConfigError, RunConfig
from fedseg.flower_compat import aggregate_metricrecords
from fedseg.messages import NUM_EXAMPLES, SITE_ID
from fedseg.record_values import as_float
from strategies.aggregate import array_view, sweep, weighted_sum
from strategies.params import Param, resolve_params

_BOUND_SLACK = 1e-3  # margin for rounding in the float32 block norms behind the triangle-inequality bound


@dataclass(frozen=True)
class Reply:
    """A reply that passed the checks: its arrays (and their read-only numpy views), metrics, site
    name and the global model it answered."""

    arrays: ArrayRecord
    metrics: MetricRecord
    site: str
    global_arrays: ArrayRecord = field(repr=False, compare=False)
    views: Mapping[str, np.ndarray] = field(repr=False, compare=False)
    measured_norm: float | None = field(default=None, repr=False, compare=False)
    message: Message | None = field(default=None, repr=False, compare=False)  # the reply as received

    @cached_property
    def update_norm(self) -> float:
        """‖reply − global model‖ over the floating arrays: as the checks measured it, else measured now."""
        if self.measured_norm is not None:
            return self.measured_norm
        return math.sqrt(sum(sweep(self.global_arrays, [self.views]).squared[0].values()))


class FedSegStrategy(FlowerFedAvg):
    """FedAvg-shaped base: samples every site, checks replies, averages weighted by `site_weights`."""

    name: ClassVar[str] = ""
    params: ClassVar[tuple[Param, ...]] = (
        Param(
            "max-update-ratio",
            float,
            100.0,
            "drop a reply whose update norm exceeds this many times the global model's norm (0: off)",
            minimum=0.0,
        ),
    )
    required_metrics: ClassVar[tuple[str, ...]] = (NUM_EXAMPLES,)
    reply_records: ClassVar[tuple[str, ...]] = ()  # ArrayRecords a reply carries besides the model (SCAFFOLD)
    dp_sgd_conflict: ClassVar[str] = ""  # why the strategy cannot train with DP-SGD at the sites ("" = it can)
    # the sites keep whole personal models (Ditto): the server chooses their weight in the mean with the
    # global model (fedseg.personal_mix)
    keeps_site_models: ClassVar[bool] = False
    # why the strategy cannot run under secure aggregation ("" = it can; None: derived, see secure_aggregation_reason)
    secure_aggregation_conflict: ClassVar[str | None] = None
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
        cls.check_config(config)
        return cls(min_sites=config.min_sites, **values)

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        """Refuse run-config settings this strategy cannot train with (before round 1)."""
        if config.dp_sgd and cls.dp_sgd_conflict:
            raise ConfigError(f"strategy '{cls.strategy_name()}' cannot run with 'dp-sgd': {cls.dp_sgd_conflict}")

    @classmethod
    def secure_aggregation_reason(cls) -> str:
        """Why the strategy cannot aggregate from the examples-weighted mean of the replies alone (the only
        thing secure aggregation reveals), or "": the declared `secure_aggregation_conflict`, else derived
        from what it overrides."""
        if cls.secure_aggregation_conflict is not None:
            return cls.secure_aggregation_conflict
        if cls.reply_records:
            return f"its replies carry {', '.join(cls.reply_records)} besides the model, each needed per site"
        for hook, need in (
            ("combine", "builds the model from each site's update"),
            ("site_weights", "weights each site's update by its own rule"),
            ("check_reply", "checks each site's update"),
        ):
            if getattr(cls, hook) is not getattr(FedSegStrategy, hook):
                return f"it {need} ('{hook}'); the server only sees the examples-weighted sum"
        return ""

    # ------------------------------------------------------------------ hooks for subclasses
    def site_weights(self, replies: list[Reply]) -> list[float]:
        """Relative weight of each good reply from its metrics (default: its training examples, as FedAvg)."""
        return [as_float(reply.metrics[NUM_EXAMPLES]) for reply in replies]

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        """The new global model from the good replies (default: average weighted by `site_weights`)."""
        return weighted_sum(self.global_arrays, [r.views for r in replies], self._coefficients(replies))

    def check_reply(self, reply: Reply) -> str:
        """Extra check of a reply that passed the shared ones: "" to keep it, else the reason to drop it."""
        return ""

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint: plain values and torch tensors (default: none)."""
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
        """Remember the global model (replies are checked against it), then make the instructions."""
        self._global = arrays
        self._dropped = []
        return self.train_instructions(server_round, arrays, config, grid)

    def train_instructions(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The round's train messages (default: Flower's FedAvg sampling every site). A strategy
        that wraps another Flower strategy hands this to it."""
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check every reply, drop bad ones with a logged reason, combine the rest."""
        specs = _specs(self.global_arrays)
        messages, candidates = [], []
        for message in replies:
            if message.has_error():
                continue
            reply, reason = check_train_content(
                message.content, self.global_arrays, specs, self.required_metrics, self.reply_records
            )
            if reply is None:
                self._drop(message, "train", reason)
            else:
                messages.append(message)
                candidates.append(replace(reply, message=message))
        fused = type(self).combine is FedSegStrategy.combine
        weights = self.site_weights(candidates) if fused else []  # unchecked replies: may not sum to > 0
        coefficients = [w / sum(weights) for w in weights] if sum(weights) > 0 else None
        checked = sweep(
            self.global_arrays, [r.views for r in candidates], coefficients, measure="norm" if fused else "distance"
        )
        reference_norm = math.sqrt(checked.reference_squared)
        good = []
        for message, reply, squared in zip(messages, candidates, checked.squared, strict=True):
            reply, reason = check_update(reply, squared, not fused, reference_norm, self.max_update_ratio)
            reason = reason or self.check_reply(reply)
            if reason:
                self._drop(message, "train", reason)
            else:
                good.append(reply)
        if not good:
            return None, None
        log(INFO, "[fedseg] %s: aggregating %d site(s) in round %d", self.strategy_name(), len(good), server_round)
        all_kept = fused and len(good) == len(candidates)
        arrays = checked.arrays if all_kept and checked.arrays is not None else self.combine(server_round, good)
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

    def _coefficients(self, replies: list[Reply]) -> list[float]:
        weights = self.site_weights(replies)
        total = sum(weights)
        return [w / total for w in weights]

    def _drop(self, message: Message, stage: str, reason: str) -> None:
        site = site_name(message)
        self._dropped.append({"site": site, "stage": stage, "reason": reason})
        log(WARNING, "[fedseg] %s: %s reply dropped: %s", site, stage, reason)


def strategy_round_report(strategy: object, server_round: int) -> dict[str, Any]:
    """`strategy.round_report(server_round)` when it has one (Flower's own strategies do not)."""
    report = getattr(strategy, "round_report", None)
    return dict(report(server_round)) if callable(report) else {}


# ---------------------------------------------------------------------- shared reply checks
def _specs(arrays: ArrayRecord) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shape and dtype of every array of the global model, by key."""
    return {key: (view.shape, view.dtype) for key, view in ((k, array_view(a)) for k, a in arrays.items())}


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
    if as_float(metrics[NUM_EXAMPLES]) <= 0:
        return None, f"metric '{NUM_EXAMPLES}' must be > 0, got {metrics[NUM_EXAMPLES]!r}"
    return metrics, ""


def check_train_content(
    content: RecordDict,
    global_arrays: ArrayRecord,
    specs: Mapping[str, tuple[tuple[int, ...], np.dtype]],
    required: Iterable[str],
    extra_records: Collection[str] = (),
) -> tuple[Reply | None, str]:
    """A `Reply` if the content has the required metrics and one ArrayRecord (besides the strategy's
    `extra_records`, each required) matching the global model's keys, shapes and dtypes (`specs`);
    otherwise None and the reason. Reads only the arrays' headers."""
    metrics, reason = check_metrics(content, required)
    if metrics is None:
        return None, reason
    missing_extra = sorted(set(extra_records) - set(content.array_records))
    if missing_extra:
        return None, f"ArrayRecord(s) {missing_extra} missing"
    models = [name for name in content.array_records if name not in extra_records]
    if len(models) != 1:
        return None, f"expected one model ArrayRecord, got {len(models)}"
    arrays = content.array_records[models[0]]
    if set(arrays) != set(specs):
        missing, extra = sorted(set(specs) - set(arrays)), sorted(set(arrays) - set(specs))
        return None, f"array keys differ from the global model (missing {missing}, unexpected {extra})"
    views = {}
    for key, (shape, dtype) in specs.items():
        try:
            view = views[key] = array_view(arrays[key])
        except ValueError as err:
            return None, f"array '{key}' is malformed: {err}"
        if view.shape != shape or view.dtype != dtype:
            return None, f"array '{key}' is {view.dtype}{list(view.shape)}, the global model has {dtype}{list(shape)}"
    return Reply(arrays, metrics, site_name_from(metrics), global_arrays, views), ""


def check_update(
    reply: Reply, squared: Mapping[str, float], exact: bool, reference_norm: float, max_update_ratio: float
) -> tuple[Reply, str]:
    """The reply (with its update norm when `squared` holds exact squared distances to the global
    model, else squared norms of its floating arrays) and "" or the reason to drop it: non-finite
    values or an update norm above `max_update_ratio` × the global model's norm (at least 1)."""
    for key, value in squared.items():
        if not math.isfinite(value) and not np.isfinite(reply.views[key]).all():
            return reply, f"array '{key}' holds non-finite values"
    measured = math.sqrt(sum(squared.values()))
    if exact:
        reply = replace(reply, measured_norm=measured)
    limit = max_update_ratio * max(reference_norm, 1.0)
    if not max_update_ratio or (not exact and (measured + reference_norm) * (1 + _BOUND_SLACK) <= limit):
        return reply, ""  # ‖x − g‖ ≤ ‖x‖ + ‖g‖ ≤ limit: no exact norm needed
    if reply.update_norm > limit:
        return reply, (
            f"update norm {reply.update_norm:.3g} exceeds {max_update_ratio:g} × the global model's "
            f"norm {reference_norm:.3g}"
        )
    return reply, ""


def site_name(message: Message) -> str:
    """`site-<site-id>` from the reply's metrics when present, else `node-<node id>` (as in history)."""
    if not message.has_error() and len(message.content.metric_records) == 1:
        name = site_name_from(next(iter(message.content.metric_records.values())))
        if name:
            return name
    return f"node-{message.metadata.src_node_id}"


def site_name_from(metrics: MetricRecord) -> str:
    value = metrics.get(SITE_ID)
    return f"site-{int(value)}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def _as_record(metrics: MetricRecord) -> RecordDict:
    return RecordDict({"metrics": metrics})
