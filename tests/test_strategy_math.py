"""Strategy arithmetic on hand-built Flower replies: FedAvg parity, DP clipping/noise/ε, Dice weights,
cyclic order, and dropping of bad replies."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from strategy_replies import (
    StubGrid,
    arrays_of,
    as_numpy,
    instructions,
    reply,
    round_config,
    task_identity,  # noqa: F401 - fixture
)
from threadpoolctl import ThreadpoolController

from strategies.aggregate import BLOCK, sweep
from strategies.cyclic import Cyclic
from strategies.dice_weighted import DiceWeighted, dice_weights
from strategies.dp_noised import DPNoised
from strategies.fedavg import FedAvg
from strategies.fedprox import FedProx

pytestmark = pytest.mark.usefixtures("task_identity")
NODES = [101, 102, 103]


def model(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (scale * rng.standard_normal((4, 2, 3, 3, 3))).astype(np.float32),
        "conv.bias": (scale * rng.standard_normal(4)).astype(np.float32),
        "bn.running_var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        "bn.num_batches_tracked": np.array(int(rng.integers(0, 100)), dtype=np.int64),
    }


GLOBAL = model(0)


def site_models(seeds: tuple[int, ...] = (1, 2, 3)) -> list[dict[str, np.ndarray]]:
    """Site models a small step away from GLOBAL."""
    return [{k: (v + 0.1 * model(s)[k]).astype(v.dtype) for k, v in GLOBAL.items()} for s in seeds]


def aggregate(strategy, sites, metrics_per_site, nodes=NODES, server_round=1):
    sent = instructions(strategy, GLOBAL, nodes)
    replies = [reply(sent[n], s, **m) for n, s, m in zip(nodes, sites, metrics_per_site, strict=True)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return replies, arrays


def float_keys(state):
    return [k for k, v in state.items() if np.issubdtype(v.dtype, np.floating)]


def test_fedavg_equals_flower_fedavg_and_keeps_dtypes() -> None:
    metrics = [{"num_examples": n, "site_id": i} for i, n in enumerate((3, 7, 12))]
    replies, arrays = aggregate(FedAvg(min_sites=3), site_models(), metrics)
    ours = as_numpy(arrays)
    flower = as_numpy(FlowerFedAvg(min_train_nodes=3, min_available_nodes=3).aggregate_train(1, replies)[0])
    for key in float_keys(GLOBAL):
        assert ours[key].dtype == np.float32, key
        np.testing.assert_allclose(ours[key], flower[key], rtol=1e-6, atol=1e-7, err_msg=key)
    counters = [s["bn.num_batches_tracked"] for s in site_models()]
    assert ours["bn.num_batches_tracked"].dtype == np.int64 and ours["bn.num_batches_tracked"].shape == ()
    assert ours["bn.num_batches_tracked"] == round((3 * counters[0] + 7 * counters[1] + 12 * counters[2]) / 22)
    assert flower["bn.num_batches_tracked"].dtype == np.float64  # the cast fedseg avoids


def test_dp_noised_without_noise_and_with_huge_clip_equals_fedavg() -> None:
    metrics = [{"num_examples": 5} for _ in NODES]
    _, plain = aggregate(FedAvg(min_sites=3), site_models(), metrics)
    dp = DPNoised(min_sites=3, noise_multiplier=0.0, clipping_norm=1e9)
    _, private = aggregate(dp, site_models(), metrics)
    plain, private = as_numpy(plain), as_numpy(private)
    for key in float_keys(GLOBAL):
        assert private[key].dtype == np.float32
        np.testing.assert_allclose(private[key], plain[key], rtol=1e-6, atol=1e-6, err_msg=key)
    assert private["bn.num_batches_tracked"] == GLOBAL["bn.num_batches_tracked"]  # never taken from sites
    assert "epsilon" not in dp.round_report(1) and dp.epsilon() == math.inf  # no noise: not private


def update_norm(state) -> float:
    return math.sqrt(sum(float(np.sum((state[k].astype(np.float64) - GLOBAL[k]) ** 2)) for k in float_keys(GLOBAL)))


def test_clipping_bounds_each_update() -> None:
    big = [{k: (v + 5.0 * model(s)[k]).astype(v.dtype) for k, v in GLOBAL.items()} for s in (1, 2, 3)]
    assert min(update_norm(s) for s in big) > 10
    dp = DPNoised(min_sites=1, noise_multiplier=0.0, clipping_norm=0.5)
    _, single = aggregate(dp, big[:1], [{"num_examples": 5, "site_id": 0}], nodes=NODES[:1])
    assert update_norm(as_numpy(single)) == pytest.approx(0.5, rel=1e-5)
    _, averaged = aggregate(dp, big, [{"num_examples": 5, "site_id": i} for i in range(3)])
    assert update_norm(as_numpy(averaged)) <= 0.5 + 1e-5
    assert dp.round_report(1)["clipped-sites"] == ["site-0", "site-1", "site-2"]


def test_noise_is_calibrated_and_epsilon_accumulates() -> None:
    big_global = {"w": np.zeros(200_000, dtype=np.float32)}
    dp = DPNoised(min_sites=2, noise_multiplier=1.5, clipping_norm=0.4, target_delta=1e-5)
    epsilons = []
    for server_round in (1, 2):
        sent = dp.configure_train(server_round, arrays_of(big_global), round_config(), StubGrid([1, 2]))
        replies = [reply(m, big_global, num_examples=4) for m in sent]
        arrays, _ = dp.aggregate_train(server_round, replies)
        epsilons.append(dp.round_report(server_round)["epsilon"])
    noise = arrays["w"].numpy()
    assert noise.dtype == np.float32
    assert np.std(noise) == pytest.approx(1.5 * 0.4 / 2, rel=0.02)
    expected = dp_accounting.rdp.RdpAccountant()
    expected.compose(dp_accounting.GaussianDpEvent(1.5), 2)
    assert epsilons[0] < epsilons[1] == pytest.approx(expected.get_epsilon(1e-5), rel=1e-6)
    resumed = DPNoised(min_sites=2, noise_multiplier=1.5, clipping_norm=0.4, target_delta=1e-5)
    resumed.load_state_dict(dp.state_dict())
    assert resumed.epsilon() == pytest.approx(epsilons[1])


def test_dice_weights_follow_the_formula() -> None:
    assert dice_weights([0.2, 0.6, 0.2], [10, 10, 30], 0.0) == pytest.approx([0.2, 0.6, 0.2])
    assert dice_weights([0.2, 0.6, 0.2], [10, 10, 30], 0.5) == pytest.approx([0.2, 0.4, 0.4])
    assert dice_weights([0.0, 0.0], [1, 3], 0.0) == pytest.approx([0.25, 0.75])  # all-zero Dice guard


def test_dice_weighted_average_uses_validation_dice() -> None:
    sites = site_models()
    metrics = [
        {"num_examples": n, "val_dice": d, "site_id": i} for i, (n, d) in enumerate([(10, 0.2), (10, 0.6), (30, 0.2)])
    ]
    strategy = DiceWeighted(min_sites=3, example_mix=0.5)
    _, arrays = aggregate(strategy, sites, metrics)
    expected = 0.2 * sites[0]["conv.weight"] + 0.4 * sites[1]["conv.weight"] + 0.4 * sites[2]["conv.weight"]
    np.testing.assert_allclose(arrays["conv.weight"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert strategy.round_report(1)["weights"] == pytest.approx({"site-0": 0.2, "site-1": 0.4, "site-2": 0.4})


def test_dice_weighted_drops_dice_outside_unit_interval() -> None:
    metrics = [{"num_examples": 5, "val_dice": d, "site_id": i} for i, d in enumerate([0.5, 1.5, 0.5])]
    strategy = DiceWeighted(min_sites=3)
    aggregate(strategy, site_models(), metrics)
    assert strategy.round_report(1)["dropped-replies"] == [
        {"site": "site-1", "stage": "train", "reason": "metric 'val-dice' must be in [0, 1], got 1.5"}
    ]


def corrupt(kind: str) -> dict[str, np.ndarray]:
    state = dict(site_models()[0])
    if kind == "nan":
        state["conv.weight"] = state["conv.weight"].copy()
        state["conv.weight"][0, 0, 0, 0, 0] = np.nan
    elif kind == "shape":
        state["conv.bias"] = np.zeros(5, np.float32)
    elif kind == "dtype":
        state["conv.bias"] = state["conv.bias"].astype(np.float64)
    elif kind == "missing":
        del state["conv.bias"]
    elif kind == "absurd":
        state["conv.weight"] = state["conv.weight"] * 1e6
    return state


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("nan", "array 'conv.weight' holds non-finite values"),
        ("shape", "array 'conv.bias' is float32[5], the global model has float32[4]"),
        ("dtype", "array 'conv.bias' is float64[4], the global model has float32[4]"),
        ("missing", "array keys differ from the global model (missing ['conv.bias'], unexpected [])"),
        ("absurd", "exceeds 100 × the global model's norm"),
    ],
)
def test_bad_reply_is_dropped_and_never_averaged(kind: str, reason: str) -> None:
    good = site_models((2, 3))
    strategy = FedAvg(min_sites=3)
    metrics = [{"num_examples": 5, "site_id": i} for i in range(3)]
    _, arrays = aggregate(strategy, [corrupt(kind), *good], metrics)
    result = as_numpy(arrays)
    assert all(np.isfinite(v).all() for v in result.values())
    np.testing.assert_allclose(result["conv.weight"], (good[0]["conv.weight"] + good[1]["conv.weight"]) / 2, rtol=1e-6)
    [dropped] = strategy.round_report(1)["dropped-replies"]
    assert dropped["site"] == "site-0" and reason in dropped["reason"]


def test_reply_without_weight_metric_is_dropped() -> None:
    strategy = FedAvg(min_sites=3)
    _, arrays = aggregate(strategy, site_models(), [{"site_id": 0}, {"num_examples": 2}, {"num_examples": 2}])
    assert strategy.round_report(1)["dropped-replies"][0]["reason"] == "metric 'num-examples' missing"
    np.testing.assert_allclose(
        arrays["conv.bias"].numpy(), (site_models()[1]["conv.bias"] + site_models()[2]["conv.bias"]) / 2, rtol=1e-6
    )


def test_all_replies_bad_leaves_no_model() -> None:
    strategy = FedAvg(min_sites=1)
    assert aggregate(strategy, [corrupt("nan")], [{"num_examples": 1}], nodes=NODES[:1])[1] is None


@pytest.mark.parametrize(
    ("strategy", "mu"),
    [
        (FedProx(min_sites=3, proximal_mu=0.25), 0.25),
        (FedProx(min_sites=3), 0.01),
        (DiceWeighted(min_sites=3, proximal_mu=0.5), 0.5),
        (DiceWeighted(min_sites=3), 0.0),
    ],
)
def test_proximal_term_sends_mu(strategy, mu: float) -> None:
    sent = instructions(strategy, GLOBAL, NODES)
    assert {m.content["config"]["proximal-mu"] for m in sent.values()} == {mu}


def test_cyclic_visits_sites_in_site_id_order_and_iil_stops_after_one_pass() -> None:
    site_of_node = {30: 0, 10: 2, 20: 1}
    strategy = Cyclic(min_sites=3, cycles=1)
    evaluate = strategy.configure_evaluate(0, arrays_of(GLOBAL), round_config(), StubGrid(list(site_of_node)))
    strategy.aggregate_evaluate(
        0, [reply(m, None, num_examples=2, dice=0.1, site_id=site_of_node[m.metadata.dst_node_id]) for m in evaluate]
    )
    visited = []
    for server_round in (1, 2, 3, 4):
        sent = list(
            strategy.configure_train(server_round, arrays_of(GLOBAL), round_config(), StubGrid(list(site_of_node)))
        )
        visited.append([site_of_node[m.metadata.dst_node_id] for m in sent])
        if sent:
            trained = site_models((server_round,))[0]
            arrays, _ = strategy.aggregate_train(server_round, [reply(sent[0], trained, num_examples=3)])
            for key, value in trained.items():
                np.testing.assert_array_equal(arrays[key].numpy(), value)  # the site's model, exactly
    assert visited == [[0], [1], [2], []]
    assert strategy.state_dict()["turn"] == 3


def test_ciil_repeats_the_cycle() -> None:
    strategy = Cyclic(min_sites=2)
    order = [
        [
            m.metadata.dst_node_id
            for m in strategy.configure_train(r, arrays_of(GLOBAL), round_config(), StubGrid([7, 5]))
        ]
        for r in range(1, 6)
    ]
    assert order == [[5], [7], [5], [7], [5]]  # unknown site ids: node-id order


def test_multi_block_tensors_equal_flower_and_a_late_inf_is_found() -> None:
    size = 3 * BLOCK + 5  # four blocks, the last one partial
    base = {
        "w": np.random.default_rng(0).standard_normal(size).astype(np.float32),
        "steps": np.array(7, dtype=np.int64),
    }
    sites = [{"w": base["w"] + np.float32(0.01 * (i + 1)), "steps": base["steps"] + i} for i in range(4)]
    strategy = FedAvg(min_sites=4)
    nodes = [1, 2, 3, 4]
    sent = instructions(strategy, base, nodes)
    replies = [reply(sent[n], s, num_examples=n, site_id=n) for n, s in zip(nodes, sites, strict=True)]
    ours = as_numpy(strategy.aggregate_train(1, replies)[0])
    flower = as_numpy(FlowerFedAvg(min_train_nodes=4, min_available_nodes=4).aggregate_train(1, replies)[0])
    assert ours["w"].dtype == np.float32 and ours["steps"].dtype == np.int64
    np.testing.assert_allclose(ours["w"], flower["w"], rtol=1e-6, atol=1e-7)

    sites[2]["w"] = sites[2]["w"].copy()
    sites[2]["w"][-1] = np.inf
    replies[2] = reply(sent[3], sites[2], num_examples=3, site_id=3)
    ours = as_numpy(strategy.aggregate_train(1, replies)[0])
    kept = [replies[i] for i in (0, 1, 3)]
    flower = as_numpy(FlowerFedAvg(min_train_nodes=3, min_available_nodes=3).aggregate_train(1, kept)[0])
    np.testing.assert_allclose(ours["w"], flower["w"], rtol=1e-6, atol=1e-7)
    assert strategy.round_report(1)["dropped-replies"] == [
        {"site": "site-3", "stage": "train", "reason": "array 'w' holds non-finite values"}
    ]


class NormRecorder(FedAvg):
    """FedAvg that records each checked reply's update norm (measured on demand, as `combine` is FedAvg's)."""

    name = "norm-recorder"

    def check_reply(self, reply) -> str:
        self.norms[reply.site] = reply.update_norm
        return ""


def test_update_norm_near_the_limit_is_measured_exactly() -> None:
    g = {"w": np.full(1000, 0.1, np.float32)}  # ‖g‖ = 3.16, limit with ratio 2: 6.32
    direction = np.random.default_rng(1).standard_normal(1000).astype(np.float32)
    direction /= np.linalg.norm(direction)
    steps = {0: 6.0, 1: 6.6, 2: 0.5}  # ‖x − g‖: below, above, well below the limit; ‖x‖ + ‖g‖ > 6.32 for 0 and 1
    sites = [{"w": g["w"] + np.float32(step) * direction} for step in steps.values()]
    strategy = NormRecorder(min_sites=2, max_update_ratio=2.0)
    strategy.norms = {}
    sent = strategy.configure_train(1, arrays_of(g), round_config(), StubGrid(NODES))
    replies = [reply(m, s, num_examples=1, site_id=i) for i, (m, s) in enumerate(zip(sent, sites, strict=True))]
    arrays, _ = strategy.aggregate_train(1, replies)
    [dropped] = strategy.round_report(1)["dropped-replies"]
    assert dropped["site"] == "site-1" and dropped["reason"].startswith("update norm 6.6 exceeds 2 ×")
    assert strategy.norms == pytest.approx({"site-0": 6.0, "site-2": 0.5}, rel=1e-5)
    np.testing.assert_allclose(arrays["w"].numpy(), (sites[0]["w"] + sites[2]["w"]) / 2, rtol=1e-6)


class ThreadsSeen(dict):
    """A record (key → array) that notes how many BLAS threads are allowed whenever it is read."""

    seen: list[int]

    def __getitem__(self, key: str) -> np.ndarray:
        self.seen.append(
            min(pool["num_threads"] for pool in ThreadpoolController().info() if pool["user_api"] == "blas")
        )
        return super().__getitem__(key)


def test_sweep_holds_blas_to_one_thread_and_restores_it() -> None:
    controller = ThreadpoolController()
    with controller.limit(limits=2, user_api="blas"):
        before = [pool["num_threads"] for pool in controller.info() if pool["user_api"] == "blas"]
        record = ThreadsSeen(w=np.ones(BLOCK + 3, np.float32))
        record.seen = []
        reference = arrays_of({"w": np.zeros(BLOCK + 3, np.float32)})
        summed = sweep(reference, [record, record], [0.25, 0.5]).arrays
        after = [pool["num_threads"] for pool in controller.info() if pool["user_api"] == "blas"]
    assert record.seen == [1, 1]
    assert after == before and max(before) == 2
    np.testing.assert_array_equal(summed["w"].numpy(), np.full(BLOCK + 3, 0.75, np.float32))
