"""Flower ClientApp (Message API): train → fit from the global weights; evaluate → test and validation Dice;
query → answer the server's probe of a dropped site.

Replies carry only the weight arrays and aggregate metrics (counts, loss, Dice, seconds).
A site whose data is broken answers with an error reply naming the problem; the
federation goes on without it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from clients.local_round import LocalRound, train_round
from clients.personal import PersonalState
from clients.site_runtime import (
    ChannelMismatch,
    SiteRuntime,
    runtime_for,
    site_state_dir,
)
from clients.weights import state_from_record
from fedseg import messages as m
from fedseg.data.datalist import SiteDataError
from fedseg.enhancing import candidate_metrics
from fedseg.labels import LabelScheme
from fedseg.personal_mix import candidate_metrics as personal_weight_metrics
from fedseg.privacy import PrivacyBudgetExceeded
from fedseg.record_values import as_float, as_int
from fedseg.secagg import site as secagg_site
from fedseg.trainer import EvalResult

log = logging.getLogger("fedseg.client")

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local training from the received global weights (clients.local_round)."""
    try:
        site, done, metrics = _fit(msg, context)
    except Exception as err:  # noqa: BLE001 - any site failure becomes an error reply, not a crash
        return _error_reply(msg, "train", err)
    records = {m.ARRAYS: ArrayRecord(done.weights), **{k: ArrayRecord(v) for k, v in done.extra_arrays.items()}}
    site.trainer.release_memory()  # the next simulated client in this process may need the GPU memory
    return Message(content=RecordDict({**records, m.METRICS: metrics}), reply_to=msg)


@app.train(m.SECAGG_TRAIN)
def secure_train(msg: Message, context: Context) -> Message:
    """Secure aggregation's train stage: the same local fit, then the site checks its own update and
    sends it only masked (fedseg.secagg.site); the metrics go as in a plain train reply."""
    try:
        site, done, metrics = _fit(msg, context)
        content = msg.content
        noise = secagg_site.DistributedNoise.from_config(content.config_records[m.CONFIG])  # dp-distributed
        masked = secagg_site.mask(
            content.config_records[m.SECAGG],
            context,
            content.array_records[m.ARRAYS],
            done.weights,
            as_float(metrics[m.NUM_EXAMPLES]),
            noise,
        )
    except Exception as err:  # noqa: BLE001
        return _error_reply(msg, "train", err)
    site.trainer.release_memory()
    return Message(content=RecordDict({m.SECAGG_MASKED: masked, m.METRICS: metrics}), reply_to=msg)


@app.train(m.SECAGG_SETUP)
def secure_setup(msg: Message, context: Context) -> Message:
    """Secure aggregation: this round's key pairs; the reply holds the public keys."""
    return _secagg_reply(msg, context, secagg_site.setup)


@app.train(m.SECAGG_SHARE)
def secure_share(msg: Message, context: Context) -> Message:
    """Secure aggregation: the round secrets' shares, encrypted for each other site."""
    return _secagg_reply(msg, context, secagg_site.share)


@app.train(m.SECAGG_UNMASK)
def secure_unmask(msg: Message, context: Context) -> Message:
    """Secure aggregation: the shares the server needs to remove the masks from the sum."""
    return _secagg_reply(msg, context, secagg_site.unmask)


def _secagg_reply(msg: Message, context: Context, stage: Callable[[ConfigRecord, Context], ConfigRecord]) -> Message:
    try:
        answer = stage(msg.content.config_records[m.SECAGG], context)
    except Exception as err:  # noqa: BLE001
        return _error_reply(msg, "secure aggregation", err)
    return Message(content=RecordDict({m.SECAGG: answer}), reply_to=msg)


def _fit(msg: Message, context: Context) -> tuple[SiteRuntime, LocalRound, MetricRecord]:
    """The local fit an instruction asks for and the reply's metrics."""
    config = msg.content.config_records[m.CONFIG]
    site = runtime_for(context, as_int(config.get(m.IN_CHANNELS, 0)))
    # A resumed run is a new Flower run: the server's run key keeps ε accumulating in one ledger.
    run = str(config.get(m.RUN_KEY, context.run_id))
    privacy = site.privacy_for(context, run)
    done = train_round(site, msg.content, config, PersonalState(site_state_dir(context), run), privacy)
    validation = site.trainer.evaluate(site.val_set)
    metrics = MetricRecord(
        {
            m.NUM_EXAMPLES: done.result.num_examples,
            m.TRAIN_LOSS: done.result.train_loss,
            m.VAL_DICE: validation.mean_dice,
            m.TRAIN_SECONDS: done.result.seconds,
            m.SITE_ID: site.site_id,
            **(privacy.metrics() if privacy else {}),  # sample-level ε so far at δ; the ledger stays here
        }
    )
    return site, done, metrics


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Dice of the received global weights on the site's held-out test split (and validation split,
    for the server's best-round choice); with a personal model (FedBN, Ditto) also its test Dice."""
    try:
        site = runtime_for(context, _in_channels(msg))
        started = time.perf_counter()
        received = state_from_record(msg.content.array_records[m.ARRAYS])
        config = msg.content.config_records.get(m.CONFIG)
        run = str(config.get(m.RUN_KEY, context.run_id)) if config is not None else str(context.run_id)
        state = PersonalState(site_state_dir(context), run)
        own = state.personal_model(received)
        result = site.trainer.evaluate(site.test_set, weights=received)
        # the server picks its best round on these, the enhancing-tumour threshold (fedseg.enhancing) and the
        # weight of a whole personal model in its mean with the global one (fedseg.personal_mix)
        validation = site.trainer.evaluate(
            site.val_set,
            enhancing=site.config.chooses_enhancing_threshold,
            personal=own if own is not None and state.has_own_model() else None,
        )
        personal = site.trainer.evaluate(site.test_set, weights=own) if own is not None else None
    except Exception as err:  # noqa: BLE001
        return _error_reply(msg, "evaluate", err)
    site.trainer.release_memory()
    metrics = evaluation_metrics(result, site.trainer.labels)
    metrics[m.VAL_DICE] = validation.mean_dice
    if validation.enhancing is not None:
        metrics.update(candidate_metrics(validation.enhancing))
    if personal is not None:
        metrics[m.PERSONAL_DICE] = personal.mean_dice
    if validation.personal_weights is not None:
        metrics.update(personal_weight_metrics(site.trainer.labels, validation.personal_weights))
    metrics[m.EVAL_SECONDS] = time.perf_counter() - started
    metrics[m.SITE_ID] = site.site_id
    return Message(content=RecordDict({m.METRICS: metrics}), reply_to=msg)


@app.query()
def probe(msg: Message, context: Context) -> Message:
    """The server asks a dropped site whether it is back: yes once its data checks out again."""
    try:
        site = runtime_for(context, _in_channels(msg))
    except Exception as err:  # noqa: BLE001
        return _error_reply(msg, "probe", err)
    return Message(content=RecordDict({m.METRICS: MetricRecord({m.SITE_ID: site.site_id})}), reply_to=msg)


def evaluation_metrics(result: EvalResult, labels: LabelScheme) -> MetricRecord:
    """Aggregate Dice metrics of one site: the mean and one per scored structure (no per-case values)."""
    metrics = MetricRecord({m.NUM_EXAMPLES: result.num_cases, m.DICE: result.mean_dice})
    for name, dice in zip(labels.metric_names, result.class_dice, strict=True):
        metrics[name] = dice
    return metrics


def _in_channels(msg: Message) -> int:
    """The global model's image channels as the instruction states them (0: not stated)."""
    config = msg.content.config_records.get(m.CONFIG)
    return as_int(config.get(m.IN_CHANNELS, 0)) if config is not None else 0


def _error_reply(msg: Message, stage: str, err: Exception) -> Message:
    """Log the full error locally; send the server a code and a reason built without the error's text."""
    log.error("%s failed at this site: %s: %s", stage, type(err).__name__, err)
    reason = f"{stage} failed at this site: {type(err).__name__}: {public_reason(err)} (details in the site's log)"
    code = m.SITE_ERROR_CODE
    if isinstance(err, PrivacyBudgetExceeded):
        code = m.PRIVACY_BUDGET_CODE
    elif isinstance(err, ChannelMismatch):
        code = m.CHANNELS_CODE
    elif isinstance(err, MemoryError | torch.OutOfMemoryError):
        code = m.OUT_OF_MEMORY_CODE
    elif isinstance(err, secagg_site.UpdateRefused | secagg_site.SecureRoundError):
        code = m.SECAGG_CODE
    return Message(Error(code=code, reason=reason), reply_to=msg)


def public_reason(err: Exception) -> str:
    """What may leave the site about `err`, by construction (an allow-list): a SiteDataError's `public`
    text (kinds and counts), the privacy budget's numbers, or a fixed phrase. An exception's own
    message is never sent: paths, file names (with spaces or not) and subject ids can hide anywhere in it."""
    if isinstance(err, SiteDataError):
        return err.public
    if isinstance(err, PrivacyBudgetExceeded):
        return str(err)  # fedseg.privacy builds it from ε, the budget and δ only
    if isinstance(err, MemoryError | torch.OutOfMemoryError):
        return "out of memory"
    if isinstance(err, secagg_site.UpdateRefused | secagg_site.SecureRoundError):
        return str(err)  # fedseg.secagg.site raises them with fixed phrases only
    return "message withheld (it may name files or subjects)"
