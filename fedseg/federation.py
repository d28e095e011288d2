"""The round loop: send, collect per-site replies, aggregate with the strategy, record, checkpoint.

fedseg runs its own loop over a Flower strategy's configure/aggregate hooks (instead of
`Strategy.start`) so that it can keep per-site metrics and failures in history.json,
write history.json and the checkpoint after every round (best-model.pt whenever the global
model reaches its best mean validation Dice over the sites; model.pt once the run ends: the last
global model, or with `swa-rounds` the mean of the last rounds' global models, fedseg.weight_average),
resume from a checkpoint, and go on without sites that died:

- A site that does not answer within `round-timeout`, or that the SuperLink reports as
  gone, is *dropped*: the round finishes with the others and later rounds no longer
  sample it. The history names it.
- A dropped site that is connected gets a *probe* (a `query` message) without waiting for
  it; once the probe's answer says the site is back (its SuperNode was restarted — with node
  authentication it keeps its node id — and its data checks out), the site *rejoins* at the
  next stage with the current global model. A site that stays hung never answers, so it
  costs no later round a `round-timeout`.
- Each stage the strategy sees only the live sites (a `LiveGrid`), and its minimum node
  counts are lowered to the number of live sites, so Flower's `sample_nodes` never waits
  forever for a site that is gone. The run stops with a clear error only when fewer than
  `min-live-sites` remain for `round-timeout` seconds.
- Replies are aggregated in a fixed order (by site), so a run is reproducible bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedseg import messages as m
from fedseg.checkpoint import (
    Checkpoint,
    restore_strategy,
    rng_state,
    set_rng_state,
    strategy_state,
)
from fedseg.config import RunConfig
from fedseg.data.sites import with_input_channels
from fedseg.enhancing import choose_min_voxels, describe
from fedseg.flower_compat import ErrorCode, Run
from fedseg.history import History, RoundRecord
from fedseg.json_records import read_json_object
from fedseg.model_checkpoint import CheckpointError, ModelCheckpoint
from fedseg.personal_mix import choose_personal_weight
from fedseg.personal_mix import describe as describe_personal_weight
from fedseg.secagg.server import SecureAggregation, SecureAggregationError
from fedseg.software import flower_app, note_software
from fedseg.tracking import NullTracker, Tracker
from fedseg.weight_average import WeightAverage
from strategies.base import strategy_round_report

# Errors the SuperLink itself sends for a node or message that is gone: the site is dropped.
NODE_GONE_ERRORS = frozenset(
    {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
)
NODE_MINIMUMS = ("min_train_nodes", "min_evaluate_nodes", "min_available_nodes")
# The metric a reply must carry (finite) to be counted in history.json, per stage.
RECORDED_METRIC = {"train": m.TRAIN_LOSS, "evaluate": m.DICE}
POLL_SECONDS = 1.0
FINAL_MODEL, BEST_MODEL = "model.pt", "best-model.pt"  # run-folder model files (fedseg.model_checkpoint format)
RUN_KEY = "run-key"  # history.json: the key that names the run to the sites
AVERAGED_MODEL = "averaged-model"  # history.json: what model.pt averages (swa-rounds) and the sites' Dice of it


class FederationError(RuntimeError):
    """The run cannot go on (too few live sites)."""


class LiveGrid(Grid):
    """A grid that shows a strategy only the given live nodes; everything else is delegated."""

    def __init__(self, grid: Grid, node_ids: Iterable[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(self, *args: object, **kwargs: object) -> Message:
        return self._grid.create_message(*args, **kwargs)  # type: ignore[arg-type]

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


@dataclass
class Federation:
    """One federated run of `strategy` over the sites reachable through `grid`."""

    grid: Grid
    strategy: Strategy
    config: RunConfig
    run_dir: Path
    tracker: Tracker = field(default_factory=NullTracker)  # gets the config and every round; closed by run()
    _site_names: dict[int, str] = field(default_factory=dict, init=False)
    _dropped: set[int] = field(default_factory=set, init=False)
    _probes: dict[str, int] = field(default_factory=dict, init=False)  # pending probe's message id → dropped node
    _run_key: str = field(default="", init=False)
    _live: set[int] = field(default_factory=set, init=False)
    _started: bool = field(default=False, init=False)
    _secure: SecureAggregation | None = field(default=None, init=False)
    _average: WeightAverage | None = field(default=None, init=False)  # swa-rounds: the final model's running mean

    def __post_init__(self) -> None:
        self.config = with_input_channels(self.config)  # every site is told the global model's input channels
        self._minimums = {name: getattr(self.strategy, name) for name in NODE_MINIMUMS if hasattr(self.strategy, name)}
        self._average = WeightAverage.last_rounds(self.config.swa_rounds, self.config.num_server_rounds)
        if self.config.secure_aggregation:  # the strategy was checked to compose (strategies.base)
            self._secure = SecureAggregation(
                self.config.secure_aggregation_bound, float(getattr(self.strategy, "max_update_ratio", 0.0))
            )

    def run(self, initial: ArrayRecord, resume: Checkpoint | None = None) -> tuple[ArrayRecord, History]:
        """Evaluate the initial model, then train and evaluate up to num-server-rounds.

        With `resume`, continue after the checkpoint's last finished round instead.
        """
        self.tracker.log_config(self.config.to_dict())
        try:
            result = self._run(initial, resume)
        except BaseException:
            self.tracker.close(failed=True)
            raise
        self.tracker.close()
        return result

    def _run(self, initial: ArrayRecord, resume: Checkpoint | None) -> tuple[ArrayRecord, History]:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            arrays, history = initial, History(config=self.config.to_dict(), extra={RUN_KEY: new_run_key(self.run_dir)})
            self._run_key = history.extra[RUN_KEY]
            note_software(history.extra, 1, flower_app(self.grid))
            record = self._evaluate(0, arrays, RoundRecord(round=0))
            self._finish_round(arrays, history, record)
        else:
            arrays, history = self._restore(resume)
        for server_round in range(history.rounds[-1].round + 1, self.config.num_server_rounds + 1):
            started = time.perf_counter()
            record = RoundRecord(round=server_round)
            arrays = self._train(server_round, arrays, record)
            if self._average is not None:
                self._average.add(server_round, arrays)
            self._evaluate(server_round, arrays, record)
            record.strategy = strategy_round_report(self.strategy, server_round)
            record.seconds = time.perf_counter() - started
            self._finish_round(arrays, history, record)
        last = history.rounds[-1].round
        if self._average is not None and self._average.count:
            arrays = self._average.arrays(like=arrays)
            history.extra[AVERAGED_MODEL], scored = self._score_average(last, arrays)
            self._save_model(arrays, FINAL_MODEL, f"final model: {self._average.describe(last)}", scored)
            history.save(self.run_dir / "history.json")
        else:
            self._save_model(arrays, FINAL_MODEL, f"final model after round {last}", history.rounds[-1])
        return arrays, history

    def _score_average(self, last: int, arrays: ArrayRecord) -> tuple[dict[str, object], RoundRecord]:
        """The sites' Dice of the averaged final model (one evaluate stage the strategy does not aggregate):
        the per-round figures in history.json are those of the global model the sites trained on."""
        assert self._average is not None
        record = self._evaluate(last, arrays, RoundRecord(round=last), aggregate=False)
        model = self._average.describe(last)
        log(INFO, "[fedseg] model.pt, %s: mean Dice %.3f, validation %.3f", model, record.mean_dice, record.val_dice)
        return {"model": model, "dice": record.mean_dice, "val-dice": record.val_dice}, record

    # ------------------------------------------------------------------ rounds
    def _train(self, server_round: int, arrays: ArrayRecord, record: RoundRecord) -> ArrayRecord:
        config = self._instruction(
            {m.LOCAL_EPOCHS: self.config.local_epochs, m.LEARNING_RATE: self.config.round_learning_rate(server_round)}
        )

        def configure(grid: Grid) -> Iterable[Message]:
            return self.strategy.configure_train(server_round, arrays, config, grid)

        if self._secure is None:
            replies = self._stage("train", configure, record)
            aggregated = [reply for _, reply in replies]
        else:
            replies, aggregated = self._secure_train(server_round, configure, record)
        record.train = self._collect(replies, "train", record)
        new_arrays, _ = self.strategy.aggregate_train(server_round, aggregated)
        if new_arrays is None:
            log(WARNING, "round %d: no usable training reply; the global model is unchanged", server_round)
            return arrays
        return new_arrays

    def _secure_train(
        self, server_round: int, configure: Callable[[Grid], Iterable[Message]], record: RoundRecord
    ) -> tuple[list[tuple[int, Message]], list[Message]]:
        """The train stage as a secure round (fedseg.secagg): the sites' masked replies (their metrics
        go to the history) and at most one reply for the strategy, holding the unmasked mean model."""
        assert self._secure is not None
        messages = self._configure("train", configure, record)

        def fail(node: int, reason: str, code: int | None) -> None:
            self._fail(node, "train", reason, record, drop=code in NODE_GONE_ERRORS)

        try:
            result = self._secure.train(
                server_round, messages, lambda msgs: self._exchange("train", msgs, record), fail
            )
        except SecureAggregationError as err:
            raise FederationError(str(err)) from None
        if result.aggregate is None:
            record.failures.append({"site": "all", "stage": "train", "reason": result.reason})
        return self._ordered(result.replies), [result.aggregate] if result.aggregate is not None else []

    def _evaluate(
        self, server_round: int, arrays: ArrayRecord, record: RoundRecord, aggregate: bool = True
    ) -> RoundRecord:
        """The sites' Dice of `arrays` into `record`; the strategy aggregates the replies unless told not to."""
        replies = self._stage(
            "evaluate",
            lambda grid: self.strategy.configure_evaluate(server_round, arrays, self._instruction({}), grid),
            record,
        )
        record.eval = self._collect(replies, "evaluate", record)
        if aggregate:
            self.strategy.aggregate_evaluate(server_round, [reply for _, reply in replies])
        return record

    def _save_model(self, arrays: ArrayRecord, name: str, what: str, scored: RoundRecord) -> None:
        """Write global weights in the model file format `fedseg predict` reads (fedseg.model_checkpoint),
        with the post-processing the sites' validation replies in `scored` (its evaluation) choose."""
        description = f"fedseg run {self.run_dir.name}: {what}"
        threshold = 0
        if self.config.chooses_enhancing_threshold:
            threshold, before, after = choose_min_voxels(scored.eval.values())
            if math.isnan(before):
                log(WARNING, "[fedseg] %s: no site sent validation ET Dice per threshold; ET kept as predicted", name)
            else:
                chosen = describe(threshold)
                log(INFO, "[fedseg] %s: %s (validation ET Dice %.3f → %.3f)", name, chosen, before, after)
                description += f"; {chosen}"
        weight = None
        if getattr(self.strategy, "keeps_site_models", False):
            weight = choose_personal_weight(scored.eval.values(), self.config.labels)
        if weight is not None:
            chosen = describe_personal_weight(weight, self.config.labels)
            log(INFO, "[fedseg] %s: %s (chosen on the sites' validation Dice)", name, chosen)
            description += f"; {chosen}"
        model = ModelCheckpoint.from_config(arrays.to_torch_state_dict(), self.config, description, threshold, weight)
        model.save(self.run_dir / name)

    def _instruction(self, values: dict[str, int | float | str]) -> ConfigRecord:
        """An instruction's config: `values` plus what every site must know (the run, the model's input channels)."""
        return ConfigRecord({**values, m.RUN_KEY: self._run_key, m.IN_CHANNELS: self.config.in_channels})

    def _finish_round(self, arrays: ArrayRecord, history: History, record: RoundRecord) -> None:
        """Record the round and write the run folder: history and checkpoint (which holds the weights)."""
        history.rounds.append(record)
        if record.round and history.best_round == record.round:  # before the checkpoint: a resume redoes it
            self._save_model(
                arrays,
                BEST_MODEL,
                f"best model: round {record.round}, mean validation Dice {record.val_dice:.4f} over the sites",
                record,
            )
        history.save(self.run_dir / "history.json")
        Checkpoint(
            round=record.round,
            arrays=arrays,
            strategy_state=strategy_state(self.strategy),
            rng_state=rng_state(),
            history=history,
            site_names=self._site_names,
            weight_average=self._average.state_dict() if self._average is not None else {},
        ).save(self.run_dir)
        self.tracker.log_round(record)
        self._report(record)

    def _restore(self, checkpoint: Checkpoint) -> tuple[ArrayRecord, History]:
        self._run_key = checkpoint.history.extra.get(RUN_KEY) or _legacy_run_key(self.run_dir)
        restore_strategy(self.strategy, checkpoint.strategy_state)
        set_rng_state(checkpoint.rng_state)
        self._site_names.update(checkpoint.site_names)
        if self._average is not None and checkpoint.weight_average:
            self._average.load_state_dict(checkpoint.weight_average)
        if checkpoint.round < self.config.num_server_rounds:  # the rounds left train under this process's software
            note_software(checkpoint.history.extra, checkpoint.round + 1, flower_app(self.grid))
        log(INFO, "[fedseg] resuming %s after round %d", self.run_dir, checkpoint.round)
        return checkpoint.arrays, checkpoint.history

    # ------------------------------------------------------------------ one stage (train or evaluate)
    def _stage(
        self, stage: str, configure: Callable[[Grid], Iterable[Message]], record: RoundRecord
    ) -> list[tuple[int, Message]]:
        """Configure on the live sites, send, drop the silent ones; (node, reply) pairs in site order.

        A reply's node is the one its instruction went to: error replies that the SuperLink makes
        (e.g. for a node whose heartbeat expired) come from the SuperLink's own node id."""
        return self._ordered(self._exchange(stage, self._configure(stage, configure, record), record))

    def _configure(
        self, stage: str, configure: Callable[[Grid], Iterable[Message]], record: RoundRecord
    ) -> list[Message]:
        """The strategy's messages for the live sites (its minimum node counts lowered to their number)."""
        live = self._live_nodes(stage, record)
        for name, configured in self._minimums.items():
            setattr(self.strategy, name, max(1, min(configured, len(live))))
        return list(configure(LiveGrid(self.grid, live)))

    def _exchange(self, stage: str, messages: list[Message], record: RoundRecord) -> list[tuple[int, Message]]:
        """Send, wait at most round-timeout; (node, reply) pairs; silent sites are dropped."""
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout))
        node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}  # ids are set when sent
        pairs = [(node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id), r) for r in replies]
        for node in sorted(set(node_of.values()) - {node for node, _ in pairs}):
            reason = f"no reply within round-timeout ({self.config.round_timeout:g} s)"
            self._fail(node, stage, reason, record, drop=True)
        for node, reply in pairs:
            self._learn_site_name(node, reply)
        return pairs

    def _ordered(self, pairs: list[tuple[int, Message]]) -> list[tuple[int, Message]]:
        return sorted(pairs, key=lambda pair: (self._site_name(pair[0]), pair[0]))

    def _live_nodes(self, stage: str, record: RoundRecord) -> list[int]:
        """Connected, not dropped nodes; waits (at most round-timeout) until enough are there.

        A node that was live before and is no longer connected is dropped (and recorded).
        """
        required = self.config.min_live_sites if self._started else self.config.min_sites
        deadline = time.monotonic() + self.config.round_timeout
        polls = 0
        while len(live := self._connected(stage, record)) < required:
            if time.monotonic() >= deadline:
                key = "min-live-sites" if self._started else "min-sites"
                raise FederationError(
                    f"only {len(live)} live site(s) after waiting {self.config.round_timeout:g} s "
                    f"(round-timeout); run-config '{key}' needs {required}"
                    + (
                        f"; dropped: {', '.join(self._site_name(n) for n in sorted(self._dropped))}"
                        if self._dropped
                        else ""
                    )
                )
            if polls % 30 == 0:
                log(INFO, "[fedseg] waiting for sites: %d live, %d needed", len(live), required)
            polls += 1
            time.sleep(POLL_SECONDS)
        self._started = True
        self._live = set(live)
        return live

    def _connected(self, stage: str, record: RoundRecord) -> list[int]:
        connected = set(self.grid.get_node_ids())
        for node in sorted(self._live - connected - self._dropped):
            self._fail(node, stage, "disconnected from the SuperLink", record, drop=True)
        self._readmit_answered(connected, record)
        self._probe(sorted((self._dropped & connected) - set(self._probes.values())))
        return sorted(connected - self._dropped)

    def _probe(self, nodes: list[int]) -> None:
        """Ask dropped, connected nodes whether they are back, without waiting for the answers."""
        if not nodes:
            return
        messages = [
            Message(
                RecordDict({m.CONFIG: self._instruction({})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id="probe",
                ttl=self.config.round_timeout,
            )
            for node in nodes
        ]
        for node, message_id in zip(nodes, self.grid.push_messages(messages), strict=True):
            if message_id:
                self._probes[message_id] = node

    def _readmit_answered(self, connected: set[int], record: RoundRecord) -> None:
        """Dropped nodes whose probe was answered without error rejoin; failed probes are sent again."""
        if not self._probes:
            return
        for reply in self.grid.pull_messages(list(self._probes)):
            node = self._probes.pop(reply.metadata.reply_to_message_id, None)
            if node is None:
                continue
            if reply.has_error() or node not in connected:
                continue
            self._learn_site_name(node, reply)
            self._dropped.discard(node)
            record.rejoined.append(self._site_name(node))
            log(INFO, "[fedseg] %s is back: it rejoins with the current global model", self._site_name(node))

    def _collect(
        self, replies: list[tuple[int, Message]], stage: str, record: RoundRecord
    ) -> dict[str, dict[str, float]]:
        """Per-site metrics of replies without error; failures recorded with the site's reason."""
        per_site: dict[str, dict[str, float]] = {}
        for node, reply in replies:
            if reply.has_error():
                gone = reply.error.code in NODE_GONE_ERRORS
                self._fail(node, stage, str(reply.error.reason), record, drop=gone)
                continue
            metrics = _numeric_metrics(reply.content)
            if RECORDED_METRIC[stage] not in metrics:
                reason = f"reply without a finite '{RECORDED_METRIC[stage]}' metric"
                self._fail(node, stage, reason, record, drop=False)
                continue
            per_site[self._site_name(node)] = metrics
        return dict(sorted(per_site.items()))

    def _learn_site_name(self, node: int, reply: Message) -> None:
        """Name a node `site-<site-id>` from its reply's metrics (history and logs use it)."""
        if not reply.has_error():
            site_id = _numeric_metrics(reply.content).get(m.SITE_ID, math.nan)
            if math.isfinite(site_id):
                self._site_names[node] = f"site-{int(site_id)}"

    def _fail(self, node: int, stage: str, reason: str, record: RoundRecord, drop: bool) -> None:
        site = self._site_name(node)
        record.failures.append({"site": site, "stage": stage, "reason": reason})
        log(WARNING, "%s: %s failed: %s", site, stage, reason)
        if drop and node not in self._dropped:
            self._dropped.add(node)
            record.dropped.append(site)
            log(WARNING, "[fedseg] %s dropped: it is sampled again once it answers a probe", site)

    def _site_name(self, node: int) -> str:
        return self._site_names.get(node, f"node-{node}")

    @staticmethod
    def _report(record: RoundRecord) -> None:
        sites = "  ".join(f"{name} {m['dice']:.3f}" for name, m in record.eval.items())
        loss = "" if record.round == 0 else f"  train-loss {record.train_loss:.3f}"
        log(INFO, "[fedseg] round %d  Dice: %s  | mean %.3f%s", record.round, sites, record.mean_dice, loss)


def _numeric_metrics(content: RecordDict) -> dict[str, float]:
    """The finite scalar metrics of a reply (a malformed reply gives fewer keys, never a crash)."""
    values: dict[str, float] = {}
    for record in content.metric_records.values():
        for key, value in record.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                values[key] = float(value)
    return values


def new_run_key(run_dir: Path) -> str:
    """Names a new run to the sites (their ε ledger, their own model state): kept in history.json and
    the checkpoint, so a resumed run keeps it; a new run in the same folder (e.g. an experiment arm
    started again after its folder was deleted) gets another, so it never inherits the old run's state."""
    return f"{run_dir.name}-{secrets.token_hex(5)}"


def run_key(run_dir: Path) -> str:
    """The run key recorded in `run_dir`'s history.json (runs before run keys were recorded: derived
    from the folder's path, as they were)."""
    path = run_dir / "history.json"
    try:
        key = read_json_object(path).get(RUN_KEY)
    except ValueError as err:  # names the file and the fault
        raise CheckpointError(str(err)) from None
    if key is not None and not (isinstance(key, str) and key.isprintable()):
        raise CheckpointError(f"{path}: '{RUN_KEY}' must be a string of printable characters")
    return key or _legacy_run_key(run_dir)


def _legacy_run_key(run_dir: Path) -> str:
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:10]
    return f"{run_dir.name}-{digest}"
