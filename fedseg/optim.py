"""Optimizers the sites train with, and the learning rate of each round over the federated budget.

The schedule runs over the whole federation, not one site's fit: the server computes the rate of
round r (warm-up, then constant, cosine or polynomial decay to `lr-final-ratio` × learning-rate)
and sends it with the round's train instruction, so every site trains round r at the same rate
and a site that rejoins late picks up where the federation is. Within a round the rate is constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "poly")
POLY_POWER = 0.9  # as nnU-Net's polynomial decay

OptimizerFactory = Callable[[Iterable[nn.Parameter], float], torch.optim.Optimizer]


def optimizer_factory(name: str = "adam", weight_decay: float = 0.0, momentum: float = 0.9) -> OptimizerFactory:
    """A function (parameters, learning rate) → torch optimizer: Adam, AdamW (decoupled weight decay)
    or SGD with Nesterov momentum."""
    if name == "adam":
        return lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return lambda params, lr: torch.optim.SGD(
            params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay
        )
    raise ValueError(f"unknown optimizer '{name}'; choose one of: {', '.join(OPTIMIZERS)}")


class OptimizerStateError(ValueError):
    """Kept optimizer state that does not fit the model or the optimizer, or holds non-finite values."""


def optimizer_moments(optimizer: torch.optim.Optimizer, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as CPU tensors keyed '<parameter name>.<state name>' (Adam's
    step and moments, SGD's momentum buffer; `names`: the parameters' names in the optimizer's order):
    what a site keeps between rounds. On the CPU they are the optimizer's own tensors, not copies
    (load_optimizer_moments and PersonalState.save copy)."""
    state = optimizer.state_dict()["state"]
    return {
        f"{names[index]}.{name}": value.detach().cpu()
        for index, values in state.items()
        for name, value in values.items()
        if isinstance(value, torch.Tensor)
    }


def one_step_state(make_optimizer: OptimizerFactory) -> dict[str, torch.Tensor]:
    """The state one step of `make_optimizer`'s optimizer leaves for a parameter of shape (2,) with a
    gradient of either sign: the names a parameter's kept state must have, which of them are scalars
    (step counts) and which are never negative (step counts, second moments)."""
    probe = torch.nn.Parameter(torch.zeros(2))
    probe.grad = torch.tensor([1.0, -1.0])
    optimizer = make_optimizer([probe], 0.0)
    optimizer.step()
    return {k: v for k, v in optimizer.state[probe].items() if isinstance(v, torch.Tensor)}


def load_optimizer_moments(
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    moments: Mapping[str, torch.Tensor],
    template: Mapping[str, torch.Tensor],
) -> None:
    """Continue `optimizer` from `moments` (optimizer_moments of an optimizer of the same kind over the
    parameters `names`); its own settings (the round's learning rate) stay. OptimizerStateError
    unless every parameter with state has exactly `template`'s entries (one_step_state), scalars
    where the template has them and the parameter's shape elsewhere, all finite floats, none negative
    where the template's are not."""
    params = [param for group in optimizer.param_groups for param in group["params"]]
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in moments.items():
        owner, _, entry = key.rpartition(".")
        if owner not in index:
            raise OptimizerStateError(f"'{key}' names none of the model's {len(params)} parameters")
        if entry not in template:
            raise OptimizerStateError(f"'{key}': this optimizer keeps {sorted(template)}, not '{entry}'")
        shape = () if template[entry].dim() == 0 else tuple(params[index[owner]].shape)
        if not (isinstance(value, torch.Tensor) and value.is_floating_point() and tuple(value.shape) == shape):
            got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value)
            raise OptimizerStateError(f"'{key}' must be a float tensor of shape {shape}, got {got}")
        if not bool(torch.isfinite(value).all()):
            raise OptimizerStateError(f"'{key}' holds non-finite values")
        if bool((template[entry] >= 0).all()) and bool((value < 0).any()):
            raise OptimizerStateError(f"'{key}' holds negative values")
        state.setdefault(index[owner], {})[entry] = value.clone()
    for i, entries in state.items():
        if set(entries) != set(template):
            raise OptimizerStateError(
                f"parameter '{names[i]}' has {sorted(entries)}, this optimizer needs {sorted(template)}"
            )
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def round_learning_rate(
    base: float,
    server_round: int,
    total_rounds: int,
    schedule: str = "constant",
    warmup_rounds: int = 0,
    final_ratio: float = 0.0,
) -> float:
    """The learning rate of round `server_round` (1-based) of `total_rounds`.

    Warm-up: rounds 1 .. warmup_rounds ramp linearly up to `base` (round k: base · k / (warmup + 1)).
    Then `constant`, `cosine` (base → final_ratio · base along half a cosine) or `poly`
    (base · (1 − t)^0.9, floored at final_ratio · base), with t running from 0 at the first round
    after warm-up to 1 at the last round."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr-schedule '{schedule}'; choose one of: {', '.join(SCHEDULES)}")
    if server_round <= warmup_rounds:
        return base * server_round / (warmup_rounds + 1)
    if schedule == "constant":
        return base
    decay_rounds = max(total_rounds - warmup_rounds - 1, 1)
    t = min(max((server_round - warmup_rounds - 1) / decay_rounds, 0.0), 1.0)
    floor = final_ratio * base
    if schedule == "cosine":
        return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    return max(base * (1.0 - t) ** POLY_POWER, floor)
