"""Secure aggregation (fedseg.secagg): the unmasked sum equals FedAvg, one masked reply says nothing,
a site lost mid-round is recovered, and the run config refuses what cannot compose.

The protocol tests drive `SecureAggregation` over fedseg's LocalGrid with a ClientApp whose sites
hold given weights (every message through Flower's wire encoding); the federation tests run the
real ClientApp on tiny synthetic sites.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from inprocess_grid import (
    InProcessGrid,
    run_federation,
    task_identity,
    tiny_config,
    wire,
)

from clients.personal import HEAD, PersonalState
from fedseg import messages as m
from fedseg.cache import cache_root
from fedseg.config import ConfigError, RunConfig
from fedseg.experiments.local_grid import LocalGrid
from fedseg.federation import FederationError, run_key
from fedseg.secagg import ring
from fedseg.secagg import site as secagg_site
from fedseg.secagg.server import SecureAggregation
from strategies.aggregate import weighted_sum
from strategies.registry import build_strategy

__all__ = ["task_identity"]  # the fixture
pytestmark = pytest.mark.usefixtures("task_identity")  # server-side Messages need the identity
RUN = "run-test"
# |secure − exact| per coordinate: 2^-33 from the fixed point, plus float32 rounding of the result
TOLERANCE = 2.0**-33 + 1e-6


def model(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "conv.weight": (rng.normal(size=(4, 3, 3)) * scale).astype(np.float32),
        "conv.bias": (rng.normal(size=4) * scale).astype(np.float32),
        "norm.num_batches_tracked": np.array(rng.integers(0, 50), dtype=np.int64),
    }


class Sites:
    """A ClientApp whose sites answer secure-aggregation messages with the weights given to them."""

    def __init__(self, weights: dict[int, dict[str, np.ndarray]], examples: dict[int, int]) -> None:
        self.weights, self.examples = weights, examples
        self.dead_at: dict[int, str] = {}  # node → action at which it stops answering
        self.masked: dict[int, np.ndarray] = {}
        self.noise: secagg_site.DistributedNoise | None = None  # dp-distributed at every site
        self.app = ClientApp()
        for action in (m.SECAGG_SETUP, m.SECAGG_SHARE, m.SECAGG_UNMASK):
            self.app.train(action)(self._stage)
        self.app.train(m.SECAGG_TRAIN)(self._train)

    def _stage(self, msg: Message, context: Context) -> Message:
        stage = {
            f"train.{m.SECAGG_SETUP}": secagg_site.setup,
            f"train.{m.SECAGG_SHARE}": secagg_site.share,
            f"train.{m.SECAGG_UNMASK}": secagg_site.unmask,
        }[msg.metadata.message_type]
        return Message(RecordDict({m.SECAGG: stage(msg.content[m.SECAGG], context)}), reply_to=msg)

    def _train(self, msg: Message, context: Context) -> Message:
        node = context.node_id
        weight = 1.0 if self.noise else float(self.examples[node])
        masked = secagg_site.mask(
            msg.content[m.SECAGG], context, msg.content[m.ARRAYS], self.weights[node], weight, self.noise
        )
        self.masked[node] = masked[secagg_site.MASKED_KEY].numpy()
        metrics = MetricRecord({m.NUM_EXAMPLES: self.examples[node], m.TRAIN_LOSS: 0.5, m.SITE_ID: node})
        return Message(RecordDict({m.SECAGG_MASKED: masked, m.METRICS: metrics}), reply_to=msg)


class Grid(LocalGrid):
    """LocalGrid through Flower's wire encoding; sites in `sites.dead_at` stop answering from that stage."""

    def __init__(self, sites: Sites, nodes: int) -> None:
        super().__init__(
            {}, [{} for _ in range(nodes)], client_app=lambda msg, context: wire(sites.app(wire(msg), context))
        )  # type: ignore[arg-type]
        self.sites = sites

    def send_and_receive(self, messages, *, timeout=None):
        stages = [m.SECAGG_SETUP, m.SECAGG_SHARE, m.SECAGG_TRAIN, m.SECAGG_UNMASK]
        alive = [
            msg
            for msg in messages
            if stages.index(msg.metadata.message_type.partition(".")[2])
            < stages.index(self.sites.dead_at.get(msg.metadata.dst_node_id, "secagg_unmask"))
            + (msg.metadata.dst_node_id not in self.sites.dead_at)
        ]
        return super().send_and_receive(alive)


def secure_round(
    sites: Sites, global_model: dict[str, np.ndarray], max_update_ratio: float = 100.0, extra: dict | None = None
):
    grid = Grid(sites, len(sites.weights))
    arrays = ArrayRecord({k: Array(v) for k, v in global_model.items()})
    config = ConfigRecord({m.RUN_KEY: RUN, m.SERVER_ROUND: 1, **(extra or {})})
    instructions = [
        Message(RecordDict({m.ARRAYS: arrays, m.CONFIG: config}), dst_node_id=node, message_type="train")
        for node in grid.get_node_ids()
    ]
    failures: list[tuple[int, str]] = []

    def exchange(messages: list[Message]) -> list[tuple[int, Message]]:
        node_of = {id(msg): msg.metadata.dst_node_id for msg in messages}
        replies = grid.send_and_receive(messages)
        by_reply = {r.metadata.reply_to_message_id: r for r in replies}
        return [
            (node_of[id(msg)], by_reply[msg.metadata.message_id])
            for msg in messages
            if msg.metadata.message_id in by_reply
        ]

    result = SecureAggregation(16.0, max_update_ratio).train(
        1, instructions, exchange, lambda node, reason, code: failures.append((node, reason))
    )
    return result, arrays, failures


def fedavg(
    arrays: ArrayRecord, weights: dict[int, dict[str, np.ndarray]], examples: dict[int, int], nodes: list[int]
) -> ArrayRecord:
    total = sum(examples[n] for n in nodes)
    return weighted_sum(arrays, [weights[n] for n in nodes], [examples[n] / total for n in nodes])


def max_difference(a: ArrayRecord, b: ArrayRecord) -> float:
    return max(float(np.abs(a[k].numpy().astype(np.float64) - b[k].numpy().astype(np.float64)).max()) for k in a)


@pytest.fixture
def five_sites() -> tuple[Sites, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    global_model = model(rng)
    nodes = range(100, 105)
    weights = {
        n: {
            k: (v + model(rng, 0.05)[k]).astype(v.dtype) if v.dtype.kind == "f" else np.asarray(v + 7 * (n - 99))
            for k, v in global_model.items()
        }
        for n in nodes
    }
    examples = {n: 10 + 13 * (n - 100) for n in nodes}
    return Sites(weights, examples), global_model


def test_unmasked_sum_equals_fedavg(five_sites: tuple[Sites, dict[str, np.ndarray]]) -> None:
    sites, global_model = five_sites
    result, arrays, failures = secure_round(sites, global_model)
    assert failures == [] and result.aggregate is not None
    secure = result.aggregate.content[m.ARRAYS]
    exact = fedavg(arrays, sites.weights, sites.examples, sorted(sites.weights))
    assert max_difference(secure, exact) <= TOLERANCE
    counts = [int(sites.weights[n]["norm.num_batches_tracked"]) for n in sorted(sites.weights)]
    expected = np.rint(np.average(counts, weights=[sites.examples[n] for n in sorted(sites.weights)]))
    assert int(secure["norm.num_batches_tracked"].numpy()) == expected  # integer buffers: FedAvg's rounded mean
    assert result.aggregate.content[m.METRICS][m.NUM_EXAMPLES] == sum(sites.examples.values())


def test_masked_reply_is_unrelated_to_the_update(five_sites: tuple[Sites, dict[str, np.ndarray]]) -> None:
    sites, global_model = five_sites
    secure_round(sites, global_model)
    arrays = ArrayRecord({k: Array(v) for k, v in global_model.items()})
    for node, masked in sites.masked.items():
        delta = np.concatenate(
            [(np.asarray(sites.weights[node][k], np.float64) - arrays[k].numpy()).ravel() for k in ring.keys_of(arrays)]
        )
        seen = masked.view(np.int64).astype(np.float64)
        correlation = np.corrcoef(seen, delta)[0, 1]
        assert abs(correlation) < 0.35, (node, correlation)  # 41 values: |r| of unrelated data stays below ~0.35
        assert np.unique(masked).size == masked.size  # every word random, not the update's few distinct values


def test_large_masked_reply_correlation_is_near_zero() -> None:
    rng = np.random.default_rng(1)
    global_model = {"w": rng.normal(size=50_000).astype(np.float32)}
    weights = {
        n: {"w": global_model["w"] + rng.normal(scale=0.1, size=50_000).astype(np.float32)} for n in range(100, 103)
    }
    sites = Sites(weights, {n: 20 for n in weights})
    secure_round(sites, global_model)
    for node, masked in sites.masked.items():
        update = weights[node]["w"].astype(np.float64) - global_model["w"]
        for seen in (masked.view(np.int64).astype(np.float64), masked.astype(np.float64)):
            assert abs(np.corrcoef(seen, update)[0, 1]) < 0.03  # 50 000 values: |r| of unrelated data ~0.005


def test_site_lost_while_training_is_recovered(five_sites: tuple[Sites, dict[str, np.ndarray]]) -> None:
    sites, global_model = five_sites
    sites.dead_at = {102: m.SECAGG_TRAIN, 104: m.SECAGG_UNMASK}  # one dies training, one before unmasking
    result, arrays, _ = secure_round(sites, global_model)
    assert result.aggregate is not None
    survivors = [100, 101, 103, 104]  # 104 sent its masked update, then died: it is in the sum
    exact = fedavg(arrays, sites.weights, sites.examples, survivors)
    assert max_difference(result.aggregate.content[m.ARRAYS], exact) <= TOLERANCE


def test_too_few_survivors_leave_the_model_unchanged(five_sites: tuple[Sites, dict[str, np.ndarray]]) -> None:
    sites, global_model = five_sites
    sites.dead_at = {101: m.SECAGG_TRAIN, 102: m.SECAGG_TRAIN, 103: m.SECAGG_TRAIN}  # t = 3 of 5
    result, _, _ = secure_round(sites, global_model)
    assert result.aggregate is None
    assert "only 2 site(s) sent a masked update, 3 needed" in result.reason


def test_site_refuses_an_update_beyond_the_bound(five_sites: tuple[Sites, dict[str, np.ndarray]]) -> None:
    sites, global_model = five_sites
    sites.weights[101]["conv.bias"] = sites.weights[101]["conv.bias"] + np.float32(40.0)
    with pytest.raises(secagg_site.UpdateRefused, match="secure-aggregation-bound"):
        secure_round(sites, global_model)


def test_site_refuses_an_inconsistent_unmask_request() -> None:
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    config = ConfigRecord(
        {m.RUN_KEY: RUN, m.SERVER_ROUND: 1, m.SECAGG_INDEX: 1, m.SECAGG_COUNT: 3, m.SECAGG_THRESHOLD: 2}
    )
    secagg_site.setup(config, context)
    request = ConfigRecord({m.RUN_KEY: RUN, m.SERVER_ROUND: 1, m.SECAGG_SURVIVORS: [1, 2], m.SECAGG_DROPPED: [2]})
    with pytest.raises(secagg_site.SecureRoundError, match="out of order"):
        secagg_site.unmask(request, context)  # before the site has shared anything


# ---------------------------------------------------------------------- run config
@pytest.mark.parametrize(
    ("strategy", "fault"),
    [
        ("dice-weighted", "validation Dice"),
        ("scaffold", "scaffold-dc"),
        ("cyclic", "one site per round"),
        ("dp-noised", "each site's update"),
        ("krum", "Flower's Krum"),
        ("fednova", "own number of steps"),
    ],
)
def test_strategies_that_cannot_compose_are_refused(strategy: str, fault: str) -> None:
    config = RunConfig.from_mapping({"strategy": strategy, "secure-aggregation": True, "min-sites": 3})
    with pytest.raises(ConfigError, match=f"strategy '{strategy}' cannot run with 'secure-aggregation': .*{fault}"):
        build_strategy(config)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedbn", "fedper", "ditto", "fedadam", "fedavgm"])
def test_mean_based_strategies_compose(strategy: str) -> None:
    build_strategy(RunConfig.from_mapping({"strategy": strategy, "secure-aggregation": True, "min-sites": 3}))


def test_secure_aggregation_needs_three_sites() -> None:
    with pytest.raises(ConfigError, match="'secure-aggregation' needs 'min-sites' >= 3, got 2"):
        RunConfig.from_mapping({"secure-aggregation": True})
    with pytest.raises(ConfigError, match="'secure-aggregation-bound' must be in"):
        RunConfig.from_mapping({"secure-aggregation-bound": 0.0})


# ---------------------------------------------------------------------- federation with the real ClientApp
def test_federation_round_equals_fedavg_of_the_sites_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: dict[int, tuple[dict[str, np.ndarray], float]] = {}
    mask = secagg_site.mask

    def recording_mask(config, context, reference, weights, weight, privacy=None):
        sent[context.node_id] = ({k: v.detach().numpy().copy() for k, v in weights.items()}, weight)
        return mask(config, context, reference, weights, weight, privacy)

    monkeypatch.setattr(secagg_site, "mask", recording_mask)
    values = tiny_config(tmp_path, **{"secure-aggregation": True, "min-sites": 3, "num-server-rounds": 1})
    grid = InProcessGrid(values, 3)
    initial = None

    def keep_initial(messages: list[Message]) -> None:
        nonlocal initial
        for message in messages:
            if message.metadata.message_type == f"train.{m.SECAGG_TRAIN}" and initial is None:
                initial = message.content[m.ARRAYS]

    grid.before_send = keep_initial
    final, history = run_federation(grid, values, tmp_path / "run")
    assert sorted(sent) == [100, 101, 102] and initial is not None
    nodes = sorted(sent)
    total = sum(sent[n][1] for n in nodes)
    exact = weighted_sum(initial, [sent[n][0] for n in nodes], [sent[n][1] / total for n in nodes])
    assert max_difference(final, exact) <= TOLERANCE
    plain_replies = [r for r in grid.replies if m.ARRAYS in r.content.array_records]
    assert plain_replies == []  # no site sent its weights in the clear
    kinds = {frozenset(r.content.keys()) for r in grid.replies}  # protocol stages, masked train, evaluate
    assert kinds == {frozenset({m.SECAGG}), frozenset({m.SECAGG_MASKED, m.METRICS}), frozenset({m.METRICS})}
    assert sorted(history.rounds[1].train) == ["site-0", "site-1", "site-2"]  # per-site metrics still recorded


def test_federation_recovers_a_site_killed_mid_round(tmp_path: Path) -> None:
    values = tiny_config(tmp_path, **{"secure-aggregation": True, "min-sites": 3, "num-server-rounds": 1})
    grid = InProcessGrid(values, 4)

    def kill_while_training(messages: list[Message]) -> None:
        if any(msg.metadata.message_type == f"train.{m.SECAGG_TRAIN}" for msg in messages):
            grid.killed.add(grid.node_of(2))

    grid.before_send = kill_while_training
    _, history = run_federation(grid, values, tmp_path / "run")
    record = history.rounds[1]
    assert sorted(record.train) == ["site-0", "site-1", "site-3"]
    assert "node-102" in record.dropped or "site-2" in record.dropped
    assert not any(f["site"] == "all" for f in record.failures)  # the round's sum was unmasked


@pytest.mark.parametrize("strategy", ["fedbn", "fedper", "fedadam"])
def test_composing_strategies_run_secure_rounds(tmp_path: Path, strategy: str) -> None:
    """FedBN masks only the shared layers it sent, FedPer its whole model (its own output stage kept);
    Flower's FedAdam steps from the unmasked mean."""
    values = tiny_config(
        tmp_path, **{"secure-aggregation": True, "min-sites": 3, "num-server-rounds": 1, "strategy": strategy}
    )
    _, history = run_federation(InProcessGrid(values, 3), values, tmp_path / "run")
    record = history.rounds[1]
    assert sorted(record.train) == ["site-0", "site-1", "site-2"] and record.failures == []
    assert record.strategy.get("dropped-replies", []) == []
    kept = PersonalState(cache_root() / "site-state" / "site-0", run_key(tmp_path / "run")).load(HEAD)
    assert (kept is not None) == (strategy == "fedper")  # a secure round keeps the site's own output stage


def test_run_stops_clearly_with_too_few_sites_for_secure_aggregation(tmp_path: Path) -> None:
    values = tiny_config(tmp_path, **{"secure-aggregation": True, "min-sites": 3, "num-server-rounds": 2})
    grid = InProcessGrid(values, 3)

    def kill_two(messages: list[Message]) -> None:
        if any(msg.metadata.message_type == f"train.{m.SECAGG_TRAIN}" for msg in messages):
            grid.killed.update({grid.node_of(1), grid.node_of(2)})

    grid.before_send = kill_two
    with pytest.raises(FederationError, match="secure aggregation needs at least 3 live sites"):
        run_federation(grid, values, tmp_path / "run")
    history = (tmp_path / "run" / "history.json").read_text()
    assert '"round": 1' in history and "only 1 site(s) sent a masked update" in history  # round 1 recorded


# ---------------------------------------------------------------------- distributed DP (dp-distributed)
def dp_round(sites: Sites, global_model: dict[str, np.ndarray], clip: float, noise_std: float):
    """One secure round whose sites clip to `clip` and add N(0, noise_std²) (dp-distributed's instruction)."""
    sites.noise = secagg_site.DistributedNoise(clip, noise_std, "numpy")
    result, _, _ = secure_round(sites, global_model, max_update_ratio=0.0, extra={m.DP_CLIP: clip})
    return result


def test_distributed_dp_without_noise_is_the_clipped_uniform_mean() -> None:
    rng = np.random.default_rng(2)
    global_model = {"w": rng.normal(size=1000).astype(np.float32), "n": np.array(5, dtype=np.int64)}
    scales = {100: 0.2, 101: 1.0, 102: 3.0}  # update norms ≈ 0.2·√1000·0.1 ... some above the clip, some below
    weights = {
        n: {
            "w": global_model["w"] + np.float32(s) * rng.normal(scale=0.1, size=1000).astype(np.float32),
            "n": np.array(9, dtype=np.int64),
        }
        for n, s in scales.items()
    }
    sites = Sites(weights, {n: 10 * (n - 99) for n in weights})
    result = dp_round(sites, global_model, clip=2.0, noise_std=0.0)
    deltas = {n: weights[n]["w"].astype(np.float64) - global_model["w"] for n in weights}
    clipped = [d * min(1.0, 2.0 / np.linalg.norm(d)) for d in deltas.values()]
    expected = global_model["w"] + np.mean(clipped, axis=0)  # uniform weights, not num-examples
    aggregate = result.aggregate.content[m.ARRAYS]
    assert np.abs(aggregate["w"].numpy() - expected).max() <= TOLERANCE
    assert int(aggregate["n"].numpy()) == 5  # integer buffers keep the global value under DP
    assert result.aggregate.content[m.METRICS][m.SECAGG_SUMMED] == 3


def test_distributed_dp_noise_of_the_sum_has_the_planned_std() -> None:
    size, sites_count, clip, z = 40_000, 4, 1.0, 0.5
    global_model = {"w": np.zeros(size, np.float32)}
    weights = {n: {"w": np.zeros(size, np.float32)} for n in range(100, 100 + sites_count)}  # Δ = 0: pure noise
    sites = Sites(weights, {n: 1 for n in weights})
    result = dp_round(sites, global_model, clip, z * clip / np.sqrt(sites_count))
    mean_noise = result.aggregate.content[m.ARRAYS]["w"].numpy().astype(np.float64)
    # the sum carries N(0, (z·C)²); divided by k = m sites: std z·C/m
    assert abs(mean_noise.std() / (z * clip / sites_count) - 1) < 0.03
    assert abs(mean_noise.mean()) < 4 * z * clip / sites_count / np.sqrt(size)


def test_dp_distributed_accounts_like_dp_noised_and_charges_dropouts() -> None:
    from strategies.client_privacy import Release, epsilon_of

    config = RunConfig.from_mapping(
        {
            "strategy": "dp-distributed",
            "secure-aggregation": True,
            "min-sites": 3,
            "dp-distributed.noise-multiplier": 1.2,
        }
    )
    strategy = build_strategy(config)
    for summed in (4, 4, 3):
        strategy._sampled = 4
        aggregate = Message(
            RecordDict(
                {
                    m.ARRAYS: ArrayRecord({"w": Array(np.zeros(3, np.float32))}),
                    m.METRICS: MetricRecord({m.NUM_EXAMPLES: 10, m.SECAGG_SUMMED: summed}),
                }
            ),
            dst_node_id=1,
            message_type="train",
        )
        strategy._global = aggregate.content[m.ARRAYS]
        strategy.aggregate_train(1, [aggregate])
    expected = epsilon_of([Release(1.2, "all", 4, 4)] * 2 + [Release(1.2 * np.sqrt(3 / 4), "all", 4, 4)], 1e-5)
    assert strategy.epsilon() == pytest.approx(expected)
    assert strategy.epsilon() > epsilon_of([Release(1.2, "all", 4, 4)] * 3, 1e-5)  # the dropout cost privacy
    with pytest.raises(ConfigError, match="'dp-distributed' needs run-config 'secure-aggregation = true'"):
        build_strategy(RunConfig.from_mapping({"strategy": "dp-distributed"}))


def test_federation_with_dp_distributed_reports_epsilon(tmp_path: Path) -> None:
    values = tiny_config(
        tmp_path,
        **{
            "secure-aggregation": True,
            "min-sites": 3,
            "num-server-rounds": 1,
            "strategy": "dp-distributed",
            "dp-distributed.noise-multiplier": 1.0,
            "dp-distributed.clipping-norm": 0.5,
        },
    )
    _, history = run_federation(InProcessGrid(values, 3), values, tmp_path / "run")
    report = history.rounds[1].strategy
    assert report["summed-sites"] == 3 and report["sampled-sites"] == 3
    assert 0 < report["epsilon"] < float("inf")


# ---------------------------------------------------------------------- fedseg experiment
_EXPERIMENT = {"name": "x", "data-dir": "data", "sites": 3, "strategies": ["fedavg"]}


def test_experiment_runs_federated_arms_securely_and_single_site_arms_plain(tmp_path: Path) -> None:
    from fedseg.data.synth import synthesize
    from fedseg.experiments import ExperimentSpec, run_experiment
    from fedseg.experiments.arms import plan_arms, with_secure_aggregation

    synthesize(tmp_path / "data", "tiny", seed=0, num_sites=3)
    spec = ExperimentSpec.from_mapping(
        {
            "experiment": {
                "name": "secure",
                "data-dir": str(tmp_path / "data"),
                "sites": 3,
                "arms": ["federated"],
                "strategies": ["fedavg"],
                "output-dir": str(tmp_path / "results"),
            },
            "run": {
                "num-server-rounds": 1,
                "local-epochs": 1,
                "patch-size": "16,16,16",
                "batch-size": 2,
                "seed": 1,
                "secure-aggregation": True,
            },
        }
    )
    assert [with_secure_aggregation(arm, True) for arm in plan_arms(spec)] == [True]
    mixed = {**_EXPERIMENT, "arms": ["private", "iil", "federated"]}
    plain = plan_arms(ExperimentSpec.from_mapping({"experiment": mixed, "run": {"secure-aggregation": True}}))
    assert [(arm.kind, with_secure_aggregation(arm, True)) for arm in plain] == [
        ("private", False),
        ("private", False),
        ("private", False),
        ("federated", True),
        ("cyclic", False),
    ]
    log: list[str] = []
    run_experiment(spec, echo=log.append)
    (history,) = [json.loads(path.read_text()) for path in spec.results_dir.rglob("history.json")]
    assert history["config"]["secure-aggregation"] is True
    assert sorted(history["rounds"][1]["train"]) == ["site-0", "site-1", "site-2"]
    with pytest.raises(ConfigError, match="'dice-weighted' cannot run with 'secure-aggregation'"):
        ExperimentSpec.from_mapping(
            {"experiment": {**_EXPERIMENT, "strategies": ["dice-weighted"]}, "run": {"secure-aggregation": True}}
        )
