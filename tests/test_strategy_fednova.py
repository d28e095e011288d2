"""FedNova: the sites' updates normalised by their local steps, the objective it converges to, the
step counts it derives, and buffers averaged as FedAvg does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from inprocess_grid import InProcessGrid, run_federation, tiny_config
from strategy_replies import StubGrid, arrays_of, as_numpy, instructions, reply, task_identity

from fedseg.config import ConfigError, RunConfig
from fedseg.trainer import _passes, steps_per_fit
from strategies.fedavg import FedAvg
from strategies.fednova import FedNova, gradient_count, normalised_coefficients
from strategies.registry import build_strategy

__all__ = ["task_identity"]  # the fixture
pytestmark = pytest.mark.usefixtures("task_identity")

# ---------------------------------------------------------------------- the objective each one minimises
# Site i minimises fᵢ(w) = ½‖Aᵢ w − bᵢ‖² with plain SGD on 1, 4 and 16 subjects in batches of 1, so it
# takes 1, 4 and 16 steps per round. The federation's objective is Σ nᵢ fᵢ; FedAvg's fixed point is near
# the optimum of Σ nᵢ τᵢ fᵢ (the largest site counts 256 ×, not 16 ×), FedNova's near that of Σ nᵢ fᵢ.
RNG = np.random.default_rng(1)
SITES = [(RNG.normal(size=(4, 4)) + 2 * np.eye(4), RNG.normal(0, 3, 4)) for _ in range(3)]
SUBJECTS, LR = (1, 4, 16), 0.003


def _optimum(weights: tuple[float, ...]) -> np.ndarray:
    return np.linalg.solve(
        sum(c * a.T @ a for c, (a, _) in zip(weights, SITES, strict=True)),
        sum(c * a.T @ b for c, (a, b) in zip(weights, SITES, strict=True)),
    )


def _federate(strategy: FedAvg, rounds: int) -> np.ndarray:
    w = np.zeros(4, np.float32)
    for server_round in range(1, rounds + 1):
        messages = strategy.configure_train(server_round, arrays_of({"w": w}), ConfigRecord({}), StubGrid([1, 2, 3]))
        replies = []
        for site, (message, (a, b), n) in enumerate(zip(messages, SITES, SUBJECTS, strict=True)):
            local = w.astype(np.float64)
            for _ in range(n):  # one subject per batch
                local = local - LR * a.T @ (a @ local - b)
            replies.append(reply(message, {"w": local.astype(np.float32)}, num_examples=n, site_id=site))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        w = as_numpy(arrays)["w"]
    return w


def test_fednova_converges_to_the_federations_objective_where_fedavg_does_not() -> None:
    target = _optimum(tuple(float(n) for n in SUBJECTS))
    surrogate = _optimum(tuple(float(n * n) for n in SUBJECTS))
    assert np.linalg.norm(target - surrogate) > 0.5, "the step counts must move FedAvg's objective"
    fedavg = _federate(FedAvg(min_sites=3), 400)
    fednova = _federate(FedNova(min_sites=3, batch_size=1), 400)
    assert np.linalg.norm(fedavg - surrogate) < 0.1 * np.linalg.norm(fedavg - target), fedavg
    assert np.linalg.norm(fednova - target) < 0.1 * np.linalg.norm(target - surrogate), fednova


# ---------------------------------------------------------------------- the arithmetic
def test_steps_per_fit_are_the_batches_the_trainer_walks() -> None:
    for subjects, batch_size, epochs in [
        (7, 2, 1.0),
        (10, 2, 3.0),
        (10, 2, 0.25),
        (3, 2, 0.25),
        (44, 2, 1.5),
        (1, 4, 2),
    ]:
        batches = list(range(-(-subjects // batch_size)))
        assert steps_per_fit(subjects, epochs, batch_size) == len(list(_passes(batches, epochs))), (subjects, epochs)


def test_gradient_count_is_what_torch_sgd_with_nesterov_momentum_moves() -> None:
    """A constant gradient g: after τ steps the weight moved by lr · aᵢ · g."""
    for steps in (1, 2, 7):
        weight = torch.zeros(1, requires_grad=True)
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9, nesterov=True)
        for _ in range(steps):
            optimizer.zero_grad()
            (2.0 * weight).sum().backward()  # gradient 2
            optimizer.step()
        assert -weight.item() / (0.1 * 2.0) == pytest.approx(gradient_count(steps, "sgd", 0.9), rel=1e-5)
    assert gradient_count(7, "adam", 0.9) == 7.0 and gradient_count(7, "sgd", 0.0) == 7.0


def test_fednova_is_fedavg_when_every_site_takes_the_same_steps() -> None:
    """3, 4 and 5 subjects in batches of 5: one step each."""
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=(3, 5)).astype(np.float32), "count": np.array(10, np.int64)}
    sites = [
        {"w": (start["w"] + rng.normal(size=(3, 5))).astype(np.float32), "count": np.array(12 + i)} for i in range(3)
    ]
    results = []
    for strategy in (FedAvg(min_sites=3), FedNova(min_sites=3, batch_size=5)):
        sent = instructions(strategy, start, [1, 2, 3])
        replies = [
            reply(sent[node], site, num_examples=n, site_id=node)
            for node, site, n in zip((1, 2, 3), sites, (3, 4, 5), strict=True)
        ]
        results.append(as_numpy(strategy.aggregate_train(1, replies)[0]))
    np.testing.assert_allclose(results[1]["w"], results[0]["w"], rtol=1e-5, atol=1e-6)
    assert results[1]["count"] == results[0]["count"]


def test_fednova_weights_each_update_per_step_and_averages_buffers() -> None:
    """Two sites, 1 and 3 subjects in batches of 1: p = (¼, ¾), τ = (1, 3), τ_eff = 2.5, so each
    parameter update counts 0.625. A running variance is averaged with p: the per-step weights would
    extrapolate it (1 − 1.25 = −0.25 on the global one) and could make it negative."""
    assert normalised_coefficients([1, 3], [1, 3]) == pytest.approx([0.625, 0.625])
    strategy = FedNova(min_sites=2, batch_size=1, buffer_keys=["bn.running_var"])
    start = {"w": np.zeros(2, np.float32), "bn.running_var": np.array([1.0], np.float32)}
    sent = instructions(strategy, start, [1, 2])
    replies = [
        reply(
            sent[1],
            {"w": np.array([1.0, 0.0], np.float32), "bn.running_var": np.array([0.01], np.float32)},
            num_examples=1,
            site_id=0,
        ),
        reply(
            sent[2],
            {"w": np.array([0.0, 3.0], np.float32), "bn.running_var": np.array([0.05], np.float32)},
            num_examples=3,
            site_id=1,
        ),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(as_numpy(arrays)["w"], [0.625, 1.875])
    np.testing.assert_allclose(as_numpy(arrays)["bn.running_var"], [0.25 * 0.01 + 0.75 * 0.05])
    assert list(as_numpy(arrays)) == ["w", "bn.running_var"]
    assert strategy.round_report(1)["gradient-counts"] == {"site-0": 1.0, "site-1": 3.0}


def test_fednova_refuses_secure_aggregation() -> None:
    config = {"strategy": "fednova", "secure-aggregation": True, "min-sites": 3}
    with pytest.raises(ConfigError, match="'fednova' cannot run with 'secure-aggregation': it normalises"):
        build_strategy(RunConfig.from_mapping(config))


# ---------------------------------------------------------------------- in a federation
def test_fednova_trains_a_federation_with_the_derived_gradient_counts(tmp_path: Path) -> None:
    """Synthetic sites of 4 subjects, 2 of them for training, in batches of 2: 1 Nesterov step each."""
    values = tiny_config(tmp_path, **{"strategy": "fednova", "num-server-rounds": 2, "optimizer": "sgd"})
    _, history = run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    assert gradient_count(1, "sgd", 0.9) == pytest.approx(1.9)  # 1 + ρ
    assert history.rounds[-1].strategy["gradient-counts"] == {
        "site-0": pytest.approx(1.9),
        "site-1": pytest.approx(1.9),
    }
    assert history.rounds[-1].strategy["dropped-replies"] == []
    assert history.rounds[-1].mean_dice != history.rounds[0].mean_dice
