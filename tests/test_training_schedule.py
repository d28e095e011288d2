"""Training schedule over the federated budget, optimizer choice, and best-round model selection."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config

import clients.site_runtime
from fedseg.config import ConfigError, RunConfig
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.optim import optimizer_factory, round_learning_rate

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
            "lr-final-ratio": 0.05,
            "optimizer": "sgd",
            "learning-rate": 0.02,
        },
    )
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
