"""Training schedule over the federated budget, optimizer choice, and best-round model selection."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config

import clients.site_runtime
from clients.local_round import _finite_or_fresh
from clients.personal import OPTIMIZER, PersonalState
from fedseg.cache import cache_root
from fedseg.config import ConfigError, RunConfig
from fedseg.federation import run_key
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.optim import (
    OptimizerStateError,
    load_optimizer_moments,
    one_step_state,
    optimizer_factory,
    optimizer_moments,
    round_learning_rate,
)

__all__ = ["task_identity"]  # the fixture


def test_schedule_values() -> None:
    rates = [round_learning_rate(1.0, r, 6, "cosine", warmup_rounds=1, final_ratio=0.1) for r in range(1, 7)]
    # warm-up 1 round at half the rate, then half a cosine from 1.0 to 0.1 over rounds 2..6
    expected = [0.5] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert rates == pytest.approx(expected)
    poly = [round_learning_rate(1.0, r, 5, "poly") for r in range(1, 6)]
    assert poly == pytest.approx([(1 - k / 4) ** 0.9 for k in range(5)])
    assert round_learning_rate(0.3, 7, 10) == 0.3
    with pytest.raises(ConfigError, match="'warmup-rounds' must be in"):
        RunConfig.from_mapping({"num-server-rounds": 3, "warmup-rounds": 3})
    with pytest.raises(ConfigError, match="'optimizer' is 'lamb'"):
        RunConfig.from_mapping({"optimizer": "lamb"})


def test_optimizers() -> None:
    params = [torch.nn.Parameter(torch.ones(3))]
    sgd = optimizer_factory("sgd", weight_decay=1e-4, momentum=0.9)(params, 0.1)
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"] and sgd.param_groups[0]["lr"] == 0.1
    adamw = optimizer_factory("adamw", weight_decay=0.01)(params, 0.2)
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["weight_decay"] == 0.01


def _quadratic_weights() -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))


def _quadratic_loss(weights: torch.Tensor) -> torch.Tensor:
    """A badly conditioned 3-weight least-squares loss."""
    return ((weights - torch.tensor([0.3, 0.1, -0.4])) ** 2 * torch.tensor([1.0, 10.0, 100.0])).sum()


def _steps(name: str, moments: dict[str, torch.Tensor] | None, rates: list[float]) -> tuple[torch.Tensor, dict]:
    """One optimizer step of _quadratic_loss per rate, the optimizer rebuilt for each step (as a site's
    each round), continuing from `moments` (None: fresh every time)."""
    weights = _quadratic_weights()
    for lr in rates:
        optimizer = optimizer_factory(name)([weights], lr)
        if moments is not None:
            load_optimizer_moments(optimizer, ["w"], moments, one_step_state(optimizer_factory(name)))
        optimizer.zero_grad()
        _quadratic_loss(weights).backward()
        optimizer.step()
        if moments is not None:
            moments = optimizer_moments(optimizer, ["w"])
    return weights.detach(), moments or {}


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_kept_optimizer_continues_as_one_optimizer_would(name: str) -> None:
    rates = [0.4, 0.3, 0.2]  # large enough to overshoot: the gradients change sign
    weights = _quadratic_weights()
    one = optimizer_factory(name)([weights], rates[0])
    for lr in rates:  # one optimizer throughout, its rate set per step as the schedule would
        one.param_groups[0]["lr"] = lr
        one.zero_grad()
        _quadratic_loss(weights).backward()
        one.step()
    kept, moments = _steps(name, {}, rates)
    assert torch.allclose(kept, weights.detach(), rtol=0, atol=1e-7)
    fresh, _ = _steps(name, None, rates)
    assert not torch.allclose(fresh, weights.detach(), atol=1e-4)  # restarting each step is another path
    assert set(moments) == ({"w.step", "w.exp_avg", "w.exp_avg_sq"} if name == "adam" else {"w.momentum_buffer"})
    if name == "adam":
        assert float(moments["w.step"]) == 3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"v.exp_avg": torch.zeros(3)}, "'v.exp_avg' names none of the model's 1 parameters"),
        ({"w.momentum_buffer": torch.zeros(3)}, "this optimizer keeps ['exp_avg', 'exp_avg_sq', 'step'], not"),
        ({"w.exp_avg": torch.zeros(4)}, "'w.exp_avg' must be a float tensor of shape (3,), got torch.float32 of shape"),
        ({"w.step": torch.ones(3)}, "'w.step' must be a float tensor of shape (), got"),
        ({"w.step": torch.tensor(-1.0)}, "'w.step' holds negative values"),
        ({"w.step": torch.tensor(2)}, "'w.step' must be a float tensor of shape (), got torch.int64"),
        ({"w.exp_avg_sq": torch.tensor([1.0, float("nan"), 0.0])}, "'w.exp_avg_sq' holds non-finite values"),
        ({"w.exp_avg_sq": torch.tensor([1.0, -0.5, 0.0])}, "'w.exp_avg_sq' holds negative values"),
        ({"w.step": None}, "parameter 'w' has ['exp_avg', 'exp_avg_sq'], this optimizer needs"),
    ],
)
def test_kept_optimizer_state_that_does_not_fit_is_refused(change: dict, message: str) -> None:
    _, moments = _steps("adam", {}, [0.1])
    moments = {k: v for k, v in {**moments, **change}.items() if v is not None}
    optimizer = optimizer_factory("adam")([torch.nn.Parameter(torch.zeros(3))], 0.1)
    with pytest.raises(OptimizerStateError, match=re.escape(message)):
        load_optimizer_moments(optimizer, ["w"], moments, one_step_state(optimizer_factory("adam")))


def test_sites_keep_their_optimizer_state_between_rounds_and_never_send_it(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 3, "keep-optimizer-state": True})
    grid = InProcessGrid(values, 2)
    run_federation(grid, values, tmp_path / "run")
    for site in range(2):
        state = PersonalState(cache_root() / "site-state" / f"site-{site}", run_key(tmp_path / "run"))
        last, before = state.load(OPTIMIZER), state.load(OPTIMIZER, server_round=3)
        assert last is not None and before is not None
        steps = [float(v) for k, v in last.items() if k.endswith(".step")]
        assert steps and len(set(steps)) == 1 and steps[0] > 0
        # three rounds of steps after round 3, two before it: the count carried on
        assert steps[0] == pytest.approx(1.5 * float(next(v for k, v in before.items() if k.endswith(".step"))))
    replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    model_keys = set(replies[0].content["arrays"])
    assert all(set(r.content.array_records) == {"arrays"} and set(r.content["arrays"]) == model_keys for r in replies)


def test_a_non_finite_optimizer_state_is_not_kept(caplog: pytest.LogCaptureFixture) -> None:
    finite = {"w.step": torch.tensor(3.0), "w.exp_avg": torch.tensor([0.1, -0.2])}
    assert _finite_or_fresh(finite) is finite
    with caplog.at_level("WARNING", logger="fedseg.client"):
        assert _finite_or_fresh({**finite, "w.exp_avg_sq": torch.tensor([1.0, float("inf")])}) == {}
    assert "the next round starts a fresh optimizer" in caplog.text


@pytest.mark.parametrize("content", ["garbage", "wrong shapes"])
def test_an_unusable_kept_optimizer_state_fails_that_sites_reply_only(
    tmp_path: Path, task_identity: None, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 3, "keep-optimizer-state": True})
    grid = InProcessGrid(values, 2)

    def site_0() -> PersonalState:  # the run key exists once the run has started
        return PersonalState(cache_root() / "site-state" / "site-0", run_key(tmp_path / "run"))

    def spoil_before_round_2(messages: list) -> None:
        config = messages[0].content["config"]
        if messages[0].metadata.message_type == "train" and int(config["server-round"]) == 2:
            state = site_0()
            if content == "garbage":
                state.path(OPTIMIZER).write_bytes(b"\x80\x02not a torch file")
            else:
                kept = state.load(OPTIMIZER) or {}
                state.save(OPTIMIZER, {k: torch.zeros(5) if v.dim() else v for k, v in kept.items()}, 1)

    grid.before_send = spoil_before_round_2
    with caplog.at_level("ERROR", logger="fedseg.client"):
        run_federation(grid, values, tmp_path / "run")
    path = str(site_0().path(OPTIMIZER))
    failed = [r for r in grid.replies if r.metadata.message_type == "train" and r.has_error()]
    assert len(failed) == 2 and not any(path in r.error.reason for r in failed)  # rounds 2 and 3; no path leaves
    logged = [r.getMessage() for r in caplog.records if path in r.getMessage()]
    assert len(logged) == 2 and "\n" not in logged[0] and "delete it to start that state afresh" in logged[0]
    assert ("unreadable (UnpicklingError)" if content == "garbage" else "must be a float tensor of shape") in logged[0]
    ok = [r for r in grid.replies if r.metadata.message_type == "train" and not r.has_error()]
    assert len(ok) == 4  # the other site every round, this one in round 1


@pytest.mark.parametrize("final_ratio", [0.05, 0.0])  # 0.0: the last round's rate is 0, not the base rate
def test_each_site_trains_each_round_at_the_scheduled_rate(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch, final_ratio: float
) -> None:
    used: list[tuple[str, float]] = []

    def recording_factory(name: str, weight_decay: float, momentum: float):
        make = optimizer_factory(name, weight_decay, momentum)

        def build(params, lr):
            used.append((name, lr))
            return make(params, lr)

        return build

    monkeypatch.setattr(clients.site_runtime, "optimizer_factory", recording_factory)
    clients.site_runtime._build_runtime.cache_clear()
    values = tiny_config(
        tmp_path,
        **{
            "num-server-rounds": 4,
            "lr-schedule": "cosine",
            "warmup-rounds": 1,
            "lr-final-ratio": final_ratio,
            "optimizer": "sgd",
            "learning-rate": 0.02,
        },
    )
    run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    config = RunConfig.from_mapping(values)
    expected = [config.round_learning_rate(r) for r in range(1, 5) for _ in range(2)]  # two sites a round
    assert [name for name, _ in used] == ["sgd"] * 8
    assert [lr for _, lr in used] == pytest.approx(expected)
    assert len(set(np.round(expected, 8))) >= 3  # the schedule really changes the rate
    assert expected[-1] == pytest.approx(0.02 * final_ratio)


def test_best_model_is_the_round_with_the_best_mean_validation_dice(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 4, "learning-rate": 0.03})
    grid = InProcessGrid(values, 2)
    _, history = run_federation(grid, values, tmp_path / "run")
    means = {r.round: np.mean([site["val-dice"] for site in r.eval.values()]) for r in history.rounds[1:]}
    best = max(means, key=lambda r: (means[r], -r))
    assert history.best_round == best
    assert len(set(means.values())) > 1  # the rounds differ, so the choice is not trivial
    # the saved weights are the global model of that round: the arrays its evaluate instruction carried
    evaluate_sends = [sent for sent in grid.sent if sent[0].metadata.message_type == "evaluate"]
    sent = evaluate_sends[best][0].content["arrays"].to_torch_state_dict()
    saved = ModelCheckpoint.load(tmp_path / "run" / "best-model.pt")
    assert f"round {best}," in saved.description
    assert all(torch.equal(saved.state_dict[key], sent[key]) for key in sent)
    final = ModelCheckpoint.load(tmp_path / "run" / "model.pt")
    assert final.model == "unet" and final.in_channels == 1 and final.num_classes == 3
