"""Flower's own strategies inside fedseg (strategies/flower.py): the same numbers as calling the Flower
strategy directly, fedseg's reply checks in front of it, checked parameters, exact resume."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import flwr.serverapp.strategy as flower
import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message
from flwr.serverapp.exception import AggregationError
from inprocess_grid import InProcessGrid, federation, run_federation, tiny_config
from strategy_replies import (
    StubGrid,
    arrays_of,
    as_numpy,
    reply,
    task_identity,  # noqa: F401 - fixture
)
from test_resume import ServerCrash, crash_in_round

from fedseg.checkpoint import load_checkpoint, resume_checkpoint
from fedseg.config import ConfigError, RunConfig
from fedseg.experiments.local_grid import server_identity
from fedseg.server_app import initial_weights
from strategies.flower import FlowerStrategy
from strategies.registry import BUILTIN, build_strategy, describe_installed

NODES = [11, 12, 13, 14, 15]
EXAMPLES = [3, 9, 4, 12, 6]


def model(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (scale * rng.standard_normal((4, 2, 3, 3, 3))).astype(np.float32),
        "conv.bias": (scale * rng.standard_normal(4)).astype(np.float32),
        "bn.num_batches_tracked": np.array(40 + seed, dtype=np.int64),
    }


GLOBAL = model(0)


def site_states(global_state: dict[str, np.ndarray], server_round: int) -> list[dict[str, np.ndarray]]:
    """Five site models a step away from `global_state`; the last one far off (an outlier)."""
    scales = [0.1, 0.1, 0.1, 0.1, 3.0]
    return [
        {
            k: (v + scales[i] * model(10 * server_round + i)[k]).astype(v.dtype)
            if v.dtype.kind == "f"
            else np.array(v + 5, v.dtype)
            for k, v in global_state.items()
        }
        for i in range(len(NODES))
    ]


def build(name: str, **params: Any) -> FlowerStrategy:
    return build_strategy(RunConfig.from_mapping({"strategy": name, "min-sites": len(NODES), **params}))


def train_round(
    strategy: Any,
    global_state: dict[str, np.ndarray],
    server_round: int,
    states: list[dict[str, np.ndarray]] | None = None,
    **metrics: float,
) -> dict[str, np.ndarray] | None:
    """configure_train + replies from `site_states` (or `states`) + aggregate_train; the new model."""
    sent = strategy.configure_train(server_round, arrays_of(global_state), ConfigRecord({}), StubGrid(NODES))
    sent = {m.metadata.dst_node_id: m for m in sent}
    states = site_states(global_state, server_round) if states is None else states
    replies = [
        reply(sent[node], state, num_examples=n, site_id=i, **metrics)
        for i, (node, state, n) in enumerate(zip(NODES, states, EXAMPLES, strict=True))
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return None if arrays is None else as_numpy(arrays)


def as_global_dtypes(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flower's raw result with the global model's dtypes (what fedseg sends on)."""
    return {k: (v if GLOBAL[k].dtype.kind == "f" else np.rint(v)).astype(GLOBAL[k].dtype) for k, v in state.items()}


def assert_same(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    assert list(ours) == list(GLOBAL)
    for key, value in ours.items():
        assert value.dtype == GLOBAL[key].dtype, key
        np.testing.assert_array_equal(value, theirs[key], err_msg=key)


# name, fedseg run-config parameters, the same Flower strategy built directly
CASES = [
    (
        "fedadam",
        {"fedadam.eta": 0.05, "fedadam.beta-2": 0.9},
        lambda: flower.FedAdam(eta=0.05, beta_2=0.9, min_train_nodes=5, min_available_nodes=5),
    ),
    ("fedyogi", {"fedyogi.eta": 0.02}, lambda: flower.FedYogi(eta=0.02, min_train_nodes=5, min_available_nodes=5)),
    (
        "fedadagrad",
        {"fedadagrad.tau": 0.01},
        lambda: flower.FedAdagrad(tau=0.01, min_train_nodes=5, min_available_nodes=5),
    ),
    (
        "fedavgm",
        {"fedavgm.server-momentum": 0.9, "fedavgm.server-learning-rate": 0.7},
        lambda: flower.FedAvgM(server_momentum=0.9, server_learning_rate=0.7, min_train_nodes=5, min_available_nodes=5),
    ),
    (
        "fedtrimmedavg",
        {"fedtrimmedavg.beta": 0.2},
        lambda: flower.FedTrimmedAvg(beta=0.2, min_train_nodes=5, min_available_nodes=5),
    ),
    ("fedmedian", {}, lambda: flower.FedMedian(min_train_nodes=5, min_available_nodes=5)),
    (
        "krum",
        {"krum.num-malicious-nodes": 1},
        lambda: flower.Krum(num_malicious_nodes=1, min_train_nodes=5, min_available_nodes=5),
    ),
]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("name", "params", "direct"), CASES, ids=[c[0] for c in CASES])
def test_two_rounds_match_the_flower_strategy_called_directly(name: str, params: dict, direct) -> None:
    ours, theirs = build(name, **params), direct()
    assert type(ours.inner) is type(theirs)
    global_state = GLOBAL
    for server_round in (1, 2):  # round 2 uses the state the strategies kept (moments, momentum)
        random.seed(server_round)
        result = train_round(ours, global_state, server_round)
        random.seed(server_round)
        expected = as_global_dtypes(train_round(theirs, global_state, server_round))
        assert_same(result, expected)
        assert ours.round_report(server_round) == {"dropped-replies": []}
        global_state = result
    fedavg = train_round(build("fedavg"), GLOBAL, 1)
    assert not np.allclose(train_round(build(name, **params), GLOBAL, 1)["conv.weight"], fedavg["conv.weight"])


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("name", ["fedmedian", "fedadam"])
def test_malformed_replies_are_dropped_before_flower_sees_them(name: str) -> None:
    strategy = build(name)
    seen: list[int] = []
    aggregate = strategy.inner.aggregate_train

    def spy(server_round: int, replies: list[Message]):
        seen.append(len(replies))
        return aggregate(server_round, replies)

    strategy.inner.aggregate_train = spy
    states = site_states(GLOBAL, 1)
    states[1] = {**states[1], "conv.bias": np.full(4, np.nan, np.float32)}
    states[3] = {**states[3], "conv.weight": np.zeros((4, 2, 3, 3), np.float32)}
    result = train_round(strategy, GLOBAL, 1, states)
    assert seen == [3]
    assert sorted((d["site"], d["reason"][:24]) for d in strategy.round_report(1)["dropped-replies"]) == [
        ("site-1", "array 'conv.bias' holds "),
        ("site-3", "array 'conv.weight' is f"),
    ]

    good = [0, 2, 4]
    direct = {"fedmedian": flower.FedMedian, "fedadam": flower.FedAdam}[name](min_train_nodes=3, min_available_nodes=3)
    sent = {
        m.metadata.dst_node_id: m
        for m in direct.configure_train(1, arrays_of(GLOBAL), ConfigRecord({}), StubGrid(NODES))
    }
    replies = [reply(sent[NODES[i]], states[i], num_examples=EXAMPLES[i], site_id=i) for i in good]
    assert_same(result, as_global_dtypes(as_numpy(direct.aggregate_train(1, replies)[0])))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"fedadam.eta": "high"}, "'fedadam.eta' must be a number, got 'high'"),
        (
            {"fedadam.eta-l": 0.1},
            ("strategy 'fedadam' has no parameter 'fedadam.eta-l'; valid parameters: fedadam.max-update-ratio"),
        ),
        ({"fedadam.beta-1": 1.0}, "'fedadam.beta-1' must be <= 0.999999, got 1.0"),
        ({"fedtrimmedavg.beta": 0.6}, "'fedtrimmedavg.beta' must be <= 0.49, got 0.6"),
        ({"krum.num-malicious-nodes": 1.5}, "'krum.num-malicious-nodes' must be an integer, got 1.5"),
        ({"fedavgm.server-momentum": True}, "'fedavgm.server-momentum' must be a number, got True"),
    ],
)
def test_parameters_are_typed_and_checked_before_any_round(values: dict, message: str) -> None:
    name = next(iter(values)).partition(".")[0]
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build(name, **values)


def test_parameters_reach_the_flower_strategy_and_fedseg_sets_the_rest() -> None:
    strategy = build_strategy(
        RunConfig.from_mapping(
            {"strategy": "fedyogi", "min-sites": 3, "learning-rate": 0.02, "fedyogi.beta-1": 0.5, "fedyogi.tau": 1e-4}
        )
    )
    inner = strategy.inner
    assert (inner.beta_1, inner.tau, inner.eta, inner.beta_2) == (0.5, 1e-4, 0.01, 0.99)  # Flower's defaults kept
    assert (inner.eta_l, inner.min_train_nodes, inner.fraction_train) == (0.02, 3, 1.0)  # from fedseg's run config
    assert [p.name for p in strategy.declared_params()] == ["max-update-ratio", "eta", "beta-1", "beta-2", "tau"]


def test_flower_prefix_resolves_any_flower_strategy() -> None:
    assert type(build("flower:FedAdam")) is BUILTIN["fedadam"]
    multikrum = build("flower:MultiKrum", **{"multikrum.num-nodes-to-select": 3})
    assert type(multikrum.inner) is flower.MultiKrum and multikrum.inner.num_nodes_to_select == 3
    assert multikrum.strategy_name() == "multikrum"
    fedavg = build("flower:FedAvg", **{"flower-fedavg.max-update-ratio": 5})  # fedseg's fedavg keeps its name
    assert (fedavg.strategy_name(), type(fedavg.inner), fedavg.max_update_ratio) == (
        "flower-fedavg",
        flower.FedAvg,
        5.0,
    )
    bulyan = build("flwr.serverapp.strategy:Bulyan")
    assert (bulyan.strategy_name(), type(bulyan.inner)) == ("bulyan", flower.Bulyan)
    qfedavg = build_strategy(RunConfig.from_mapping({"strategy": "flower:QFedAvg", "learning-rate": 0.05}))
    assert (qfedavg.inner.client_learning_rate, qfedavg.inner.train_loss_key) == (0.05, "train-loss")
    with pytest.raises(ConfigError, match="Flower has no strategy 'Nope'; its strategies: Bulyan, "):
        build("flower:Nope")
    with pytest.raises(
        ConfigError,
        match="DifferentialPrivacyServerSideFixedClipping cannot be used in fedseg: its "
        "argument 'strategy' \\(Strategy\\) cannot come from a run config",
    ):
        build("flower:DifferentialPrivacyServerSideFixedClipping")
    with pytest.raises(ConfigError, match="FedXgbBagging cannot be used in fedseg: it aggregates XGBoost models"):
        build("flower:FedXgbBagging")
    # another Flower strategy's keys may stay in the run config
    assert type(build("fedavg", **{"qfedavg.q": 0.2})).name == "fedavg"


@pytest.mark.usefixtures("task_identity")
def test_qfedavg_through_fedseg_uses_the_train_loss_metric() -> None:
    ours = build_strategy(
        RunConfig.from_mapping({"strategy": "flower:QFedAvg", "min-sites": 5, "qfedavg.q": 0.5, "learning-rate": 0.05})
    )

    def theirs() -> flower.QFedAvg:
        return flower.QFedAvg(
            client_learning_rate=0.05, q=0.5, train_loss_key="train-loss", min_train_nodes=5, min_available_nodes=5
        )

    with pytest.raises(TypeError, match="Cannot cast ufunc 'multiply' output"):  # Flower alone: integer buffers
        train_round(theirs(), GLOBAL, 1, train_loss=0.7)
    # fedseg hands integer buffers to the Flower strategy as float64 (and rounds the result)
    as_float = [
        {k: v if v.dtype.kind == "f" else v.astype(np.float64) for k, v in state.items()}
        for state in site_states(GLOBAL, 1)
    ]
    assert_same(
        train_round(ours, GLOBAL, 1, train_loss=0.7),
        as_global_dtypes(train_round(theirs(), GLOBAL, 1, as_float, train_loss=0.7)),
    )


@pytest.mark.usefixtures("task_identity")
def test_a_flower_aggregation_failure_keeps_the_model_and_is_reported() -> None:
    strategy = build("flower:Bulyan", **{"bulyan.num-malicious-nodes": 2})  # Bulyan needs n ≥ 4f + 3 = 11 sites
    assert_same(train_round(strategy, GLOBAL, 1), GLOBAL)
    assert strategy.round_report(1)["aggregation-error"] == "the Flower strategy returned no model"

    def fail(server_round: int, replies: list[Message]) -> None:
        raise AggregationError("Trimmed mean could not be computed")

    strategy = build("fedtrimmedavg")
    strategy.inner.aggregate_train = fail
    assert_same(train_round(strategy, GLOBAL, 1), GLOBAL)
    assert strategy.round_report(1)["aggregation-error"] == "AggregationError: Trimmed mean could not be computed"
    del strategy.inner.aggregate_train  # Flower's own again: the next round aggregates and reports no error
    assert not np.array_equal(train_round(strategy, GLOBAL, 2)["conv.weight"], GLOBAL["conv.weight"])
    assert strategy.round_report(2) == {"dropped-replies": []}


def checkpointed(state: dict[str, Any]) -> dict[str, Any]:
    """The state as checkpoint.pt stores and reads it (torch.save, torch.load(weights_only=True))."""
    buffer = io.BytesIO()
    torch.save({"strategy": state}, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)["strategy"]


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize(("name", "params"), [("fedadam", {}), ("fedavgm", {"fedavgm.server-momentum": 0.9})])
def test_state_round_trip_reproduces_the_next_aggregation_exactly(name: str, params: dict) -> None:
    running = build(name, **params)
    after_one = train_round(running, GLOBAL, 1)
    state = checkpointed(running.state_dict())
    assert any(isinstance(v, torch.Tensor) for v in _leaves(state)), "array state is stored as tensors"

    resumed = build(name, **params)
    resumed.load_state_dict(state)
    expected = train_round(running, after_one, 2)
    assert_same(train_round(resumed, after_one, 2), expected)
    fresh = train_round(build(name, **params), after_one, 2)  # without the state: a different model
    assert not np.array_equal(fresh["conv.weight"], expected["conv.weight"])
    third = train_round(running, expected, 3)
    assert_same(train_round(resumed, expected, 3), third)


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]


def test_fedseg_strategies_lists_flower_strategies_with_parameters() -> None:
    lines = describe_installed()
    assert any(line.startswith("fedadam (built-in, Flower FedAdam): Flower's FedAdam") for line in lines)
    assert "    fedadam.beta-1  float, default 0.9, in [0, 0.999999]: Momentum parameter" in lines
    assert "    krum.num-malicious-nodes  int, default 0, in [0, inf]: Number of malicious nodes in the system" in lines
    listing = next(line for line in lines if line.startswith("flower:<Class>"))
    assert listing.endswith(": Bulyan, FedAvg, FedProx, MultiKrum, QFedAvg")


def test_resumed_fedadam_federation_is_bit_identical(tmp_path: Path) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 2, "strategy": "fedadam", "fedadam.eta": 0.01})
    with server_identity():
        reference, _ = run_federation(InProcessGrid(values, 2), values, tmp_path / "reference")
        grid = InProcessGrid(values, 2)
        crash_in_round(grid, 2)
        with pytest.raises(ServerCrash):
            run_federation(grid, values, tmp_path / "interrupted")
        saved = load_checkpoint(tmp_path / "interrupted").strategy_state["flower"]
        assert set(saved) >= {"m_t", "v_t"} and saved["m_t"]["dict"]
        random.seed(1)
        torch.manual_seed(1)
        resumed_values = {**values, "resume-from": str(tmp_path / "interrupted")}
        fed = federation(InProcessGrid(values, 2), resumed_values, tmp_path / "interrupted")
        resumed, _ = fed.run(initial_weights(fed.config), resume=resume_checkpoint(fed.config))
    ours, theirs = resumed.to_torch_state_dict(), reference.to_torch_state_dict()
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
