"""One train instruction at a site: the local fit from the global model, plus what personalised and
variance-reduced strategies ask of it (FedBN, FedPer, Ditto, SCAFFOLD; see clients.personal)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord, RecordDict

from clients.personal import (
    DITTO,
    HEAD,
    NORMS,
    OPTIMIZER,
    RESET_HINT,
    SCAFFOLD,
    PersonalState,
    PersonalStateError,
    Tensors,
    scaffold_update,
)
from clients.site_runtime import SiteRuntime
from clients.weights import state_from_record
from fedseg import messages as m
from fedseg.config import UPPER_BOUNDS
from fedseg.models import head_state_keys, norm_state_keys
from fedseg.optim import OptimizerStateError
from fedseg.privacy import SitePrivacy
from fedseg.record_values import as_float, as_int
from fedseg.trainer import FitResult

DITTO_SEED_OFFSET = 7919  # the personal fit draws other patches than the global one

log = logging.getLogger("fedseg.client")


@dataclass
class LocalRound:
    """What the site sends back: its model (without its own layers), extra records and the fit's numbers."""

    weights: Tensors
    result: FitResult
    extra_arrays: dict[str, Tensors] = field(default_factory=dict)


def train_round(
    site: SiteRuntime,
    content: RecordDict,
    config: ConfigRecord,
    personal: PersonalState,
    privacy: SitePrivacy | None,
) -> LocalRound:
    """Fit from the global weights in `content` as `config` says; keep and send what the strategy asks."""
    trainer = site.trainer
    server_round = as_int(config.get(m.SERVER_ROUND, 0))
    learning_rate = as_float(config.get(m.LEARNING_RATE, site.config.learning_rate))
    epochs = as_float(config.get(m.LOCAL_EPOCHS, site.config.local_epochs))
    if not 0 < epochs <= UPPER_BOUNDS["local-epochs"]:
        raise ValueError(f"instruction '{m.LOCAL_EPOCHS}' must be in (0, {UPPER_BOUNDS['local-epochs']}], got {epochs}")
    received = state_from_record(content.array_records[m.ARRAYS])
    local_norm = bool(config.get(m.LOCAL_NORM, False))
    ditto_lambda = as_float(config.get(m.DITTO_LAMBDA, 0.0))
    scaffold = m.SCAFFOLD_C in content.array_records
    if (local_norm or ditto_lambda or scaffold) and privacy is not None:
        raise ValueError("FedBN, Ditto and SCAFFOLD do not combine with DP-SGD at the sites")

    start = dict(received)
    local_head = bool(config.get(m.LOCAL_HEAD, False))
    norm_keys = norm_state_keys(trainer.model) if local_norm else frozenset()
    head_keys = head_state_keys(trainer.model, site.config.labels.out_channels) if local_head else frozenset()
    current = trainer.get_weights() if local_norm or local_head else {}
    if local_norm:  # the site's own normalisation layers, its initial ones in its first round
        initial = {k: current[k] for k in norm_keys}
        start = {**start, **(personal.load_layers(NORMS, server_round, initial) or initial)}
    if local_head:  # the site's own output stage, the global one in its first round
        start = {**start, **(personal.load_layers(HEAD, server_round, {k: current[k] for k in head_keys}) or {})}
    correction, variate, server_variate = None, None, None
    if scaffold:
        server_variate = state_from_record(content.array_records[m.SCAFFOLD_C])
        variate = personal.load(SCAFFOLD, server_round) or {
            k: torch.zeros_like(v, dtype=torch.float32) for k, v in server_variate.items()
        }
        correction = {k: server_variate[k] - variate[k] for k in server_variate}
    keep_optimizer = site.config.keep_optimizer_state
    try:
        result = trainer.fit(
            site.train_set,
            epochs=epochs,
            start_weights=start,
            prox_mu=as_float(config.get(m.PROXIMAL_MU, 0.0)),
            seed=site.fit_seed(server_round),
            privacy=privacy,
            learning_rate=learning_rate,
            gradient_correction=correction,
            average_gradients=scaffold,
            optimizer_state=(personal.load(OPTIMIZER, server_round) or {}) if keep_optimizer else None,
        )
    except OptimizerStateError as err:
        raise PersonalStateError(f"{personal.path(OPTIMIZER)}: {err}; {RESET_HINT}") from None
    if keep_optimizer:
        personal.save(OPTIMIZER, _finite_or_fresh(result.optimizer_state or {}), server_round)
    weights = trainer.get_weights()
    out = LocalRound(weights, result)
    if local_head:
        personal.save(HEAD, {k: weights[k] for k in head_keys}, server_round)
    if local_norm:
        personal.save(NORMS, {k: weights[k] for k in norm_keys}, server_round)
        out.weights = {k: v for k, v in weights.items() if k not in norm_keys}
    if scaffold:
        assert variate is not None  # loaded above for every SCAFFOLD round
        updated, change = scaffold_update(variate, result.mean_gradients or {})
        personal.save(SCAFFOLD, updated, server_round)
        out.extra_arrays[m.SCAFFOLD_DC] = change
    if ditto_lambda:
        own = personal.load(DITTO, server_round) or dict(received)
        trainer.fit(
            site.train_set,
            epochs=epochs,
            start_weights=own,
            prox_mu=ditto_lambda,
            prox_anchor=received,
            seed=site.fit_seed(server_round) + DITTO_SEED_OFFSET,
            learning_rate=learning_rate,
        )
        personal.save(DITTO, trainer.get_weights(), server_round)
        trainer.set_weights(weights)  # the validation Dice in the reply is the sent model's
    return out


def _finite_or_fresh(moments: Tensors) -> Tensors:
    """The optimizer state to keep: none (a fresh optimizer next round) once a value went non-finite,
    so one bad step does not poison every later round at this site."""
    if all(bool(torch.isfinite(v).all()) for v in moments.values()):
        return moments
    log.warning("the optimizer state went non-finite this round; the next round starts a fresh optimizer")
    return {}
