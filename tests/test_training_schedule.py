"""Training schedule over the federated budget, optimizer choice, and best-round model selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

import clients.site_runtime
from clients.personal import OPTIMIZER, PersonalState
from fedseg.cache import cache_root
from fedseg.federation import run_key
from fedseg.config import ConfigError, RunConfig
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.optim import load_optimizer_tensors, optimizer_factory, optimizer_tensors, round_learning_rate
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config

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


def test_each_site_trains_each_round_at_the_scheduled_rate(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[tuple[str, float]] = []

    def recording_factory(name: str, weight_decay: float, momentum: float):  # noqa: ANN202
        make = optimizer_factory(name, weight_decay, momentum)

        def build(params, lr):  # noqa: ANN001, ANN202
            used.append((name, lr))
            return make(params, lr)

        return build

    monkeypatch.setattr(clients.site_runtime, "optimizer_factory", recording_factory)
    clients.site_runtime._build_runtime.cache_clear()
    values = tiny_config(tmp_path, **{"num-server-rounds": 4, "lr-schedule": "cosine", "warmup-rounds": 1,
                                      "lr-final-ratio": 0.05, "optimizer": "sgd", "learning-rate": 0.02})
    run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    config = RunConfig.from_mapping(values)
    expected = [config.round_learning_rate(r) for r in range(1, 5) for _ in range(2)]  # two sites a round
    assert [name for name, _ in used] == ["sgd"] * 8
    assert [lr for _, lr in used] == pytest.approx(expected)
    assert len(set(np.round(expected, 8))) == 4  # the schedule really changes the rate every round


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


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_a_kept_optimizer_state_continues_the_optimizer_exactly(name: str) -> None:
    """Two rounds of k steps with the state carried over = 2k steps of one optimizer; a fresh one differs."""
    torch.manual_seed(0)
    data = [(torch.randn(4, 5), torch.randn(4, 2)) for _ in range(6)]
    make = optimizer_factory(name, momentum=0.9)

    def train(model: torch.nn.Linear, batches: list, state: dict | None) -> dict:
        optimizer = make(model.parameters(), 0.05)
        if state is not None:
            load_optimizer_tensors(optimizer, state)
        for x, y in batches:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
        return optimizer_tensors(optimizer)

    torch.manual_seed(1)
    continuous, split, fresh = torch.nn.Linear(5, 2), torch.nn.Linear(5, 2), torch.nn.Linear(5, 2)
    split.load_state_dict(continuous.state_dict())
    fresh.load_state_dict(continuous.state_dict())
    train(continuous, data, None)
    kept = train(split, data[:3], None)
    train(split, data[3:], kept)
    train(fresh, data[:3], None)
    train(fresh, data[3:], None)
    assert all(torch.equal(a, b) for a, b in zip(continuous.parameters(), split.parameters(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(continuous.parameters(), fresh.parameters(), strict=True))
    with pytest.raises(ConfigError, match="'optimizer-state' is 'sometimes'"):
        RunConfig.from_mapping({"optimizer-state": "sometimes"})


def test_sites_keep_their_optimizer_state_across_rounds_and_never_send_it(
    tmp_path: Path, task_identity: None
) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 2, "optimizer-state": "keep"})
    grid = InProcessGrid(values, 2)
    run_federation(grid, values, tmp_path / "run")
    for site in range(2):
        state = PersonalState(cache_root() / "site-state" / f"site-{site}", run_key(tmp_path / "run"))
        after_one, after_two = state.load(OPTIMIZER, server_round=2), state.load(OPTIMIZER)
        assert after_one is not None and after_two is not None
        steps = {key: value for key, value in after_two.items() if key.endswith("/step")}
        assert steps and all(value == 2 * after_one[key] > 0 for key, value in steps.items())  # round 2 went on
    sent = {name for reply in grid.replies for name in reply.content.get("arrays", {})}
    assert not any("/" in name for name in sent)  # only the network's weights leave a site
    reset = tiny_config(tmp_path, **{"num-server-rounds": 1})
    run_federation(InProcessGrid(reset, 2), reset, tmp_path / "reset")
    assert PersonalState(cache_root() / "site-state" / "site-0", run_key(tmp_path / "reset")).load(OPTIMIZER) is None
