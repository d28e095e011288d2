"""Client-level DP (dp-noised): amplified ε against dp-accounting, adaptive clipping, late-joining
sites, cohort-calibrated noise, the secure noise source."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from strategy_replies import (
    StubGrid,
    arrays_of,
    reply,
    round_config,
    task_identity,  # noqa: F401 - fixture
)

from fedseg.config import ConfigError
from fedseg.noise import SecureGaussian, gaussian_source
from strategies.client_privacy import (
    QuantileClip,
    Release,
    draw_cohort,
    epsilon_of,
    update_noise_multiplier,
)
from strategies.dp_noised import DPNoised

pytestmark = pytest.mark.usefixtures("task_identity")

DELTA = 1e-5
GLOBAL = {"w": np.zeros(50_000, dtype=np.float32), "steps": np.array(3, dtype=np.int64)}


def site_state(seed: int, norm: float) -> dict[str, np.ndarray]:
    direction = np.random.default_rng(seed).standard_normal(GLOBAL["w"].size)
    return {"w": (norm * direction / np.linalg.norm(direction)).astype(np.float32), "steps": np.array(9)}


def run_round(strategy: DPNoised, server_round: int, nodes: list[int], norm: float = 0.1) -> dict:
    sent = list(strategy.configure_train(server_round, arrays_of(GLOBAL), round_config(), StubGrid(nodes)))
    replies = [
        reply(m, site_state(m.metadata.dst_node_id, norm), num_examples=4, site_id=m.metadata.dst_node_id) for m in sent
    ]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return {"arrays": arrays, "sent": sent, **strategy.round_report(server_round)}


def test_amplified_epsilon_matches_dp_accounting() -> None:
    poisson = [Release(1.2, "poisson", 80, 10)] * 30
    expected = RdpAccountant()
    expected.compose(dp_accounting.PoissonSampledDpEvent(10 / 80, dp_accounting.GaussianDpEvent(1.2)), 30)
    assert epsilon_of(poisson, DELTA) == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)
    fixed = [Release(1.2, "fixed", 80, 10)] * 30
    expected = RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    expected.compose(dp_accounting.SampledWithoutReplacementDpEvent(80, 10, dp_accounting.GaussianDpEvent(0.6)), 30)
    assert epsilon_of(fixed, DELTA) == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)
    everyone = epsilon_of([Release(1.2, "all", 80, 80)] * 30, DELTA)
    assert epsilon_of(poisson, DELTA) < everyone / 3  # sampling 1/8 of the sites amplifies privacy


def test_dp_noised_accounts_the_rounds_it_ran_with_the_sampled_rate() -> None:
    strategy = DPNoised(min_sites=1, noise_multiplier=1.0, sampling="poisson", cohort_size=5)
    for server_round in (1, 2, 3):
        report = run_round(strategy, server_round, list(range(1, 21)))
    expected = RdpAccountant()
    expected.compose(dp_accounting.PoissonSampledDpEvent(5 / 20, dp_accounting.GaussianDpEvent(1.0)), 3)
    assert report["epsilon"] == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)
    assert report["population"] == 20


def test_site_joining_in_round_three_is_aggregated_and_accounted() -> None:
    strategy = DPNoised(min_sites=2, noise_multiplier=1.5, clipping_norm=0.4)
    run_round(strategy, 1, [1, 2])
    run_round(strategy, 2, [1, 2])
    late = run_round(strategy, 3, [1, 2, 3])
    assert len(late["sent"]) == 3 and late["arrays"] is not None and not late["dropped-replies"]
    expected = RdpAccountant()
    expected.compose(dp_accounting.GaussianDpEvent(1.5), 3)
    assert late["epsilon"] == pytest.approx(expected.get_epsilon(DELTA), rel=1e-9)
    resumed = DPNoised(min_sites=2, noise_multiplier=1.5, clipping_norm=0.4)
    resumed.load_state_dict(strategy.state_dict())
    assert run_round(resumed, 4, [1, 2, 3, 4])["epsilon"] > late["epsilon"]  # a fourth site after a resume


def test_sampled_noise_is_calibrated_to_the_cohort_size() -> None:
    strategy = DPNoised(min_sites=1, noise_multiplier=2.0, clipping_norm=0.5, sampling="fixed", cohort_size=4)
    report = run_round(strategy, 1, list(range(1, 11)), norm=0.0)
    assert report["cohort"] == 4 and len(report["sent"]) == 4
    noise = report["arrays"]["w"].numpy()
    assert np.std(noise) == pytest.approx(2.0 * 0.5 / 4, rel=0.03)
    assert report["arrays"]["steps"].numpy() == 3  # integer buffers stay the global model's


def test_empty_cohort_still_releases_noise_and_counts() -> None:
    strategy = DPNoised(min_sites=1, noise_multiplier=1.0, clipping_norm=1.0, sampling="poisson", cohort_size=1)
    sent = strategy.configure_train(1, arrays_of(GLOBAL), round_config(), StubGrid([]))
    arrays, _ = strategy.aggregate_train(1, list(sent))
    assert arrays is None  # no site connected: nothing to release, nothing accounted
    strategy._population, strategy._cohort = 5, []  # five connected sites, none drawn
    arrays, _ = strategy.aggregate_train(1, [])
    assert np.std(arrays["w"].numpy()) == pytest.approx(1.0, rel=0.03)
    assert strategy.epsilon() > 0


def test_adaptive_clipping_tracks_the_target_quantile() -> None:
    norms = np.random.default_rng(0).lognormal(mean=0.0, sigma=0.5, size=(400, 50))  # 400 rounds × 50 sites
    clip, bound = QuantileClip(target_quantile=0.7, learning_rate=0.2), 0.05
    source = np.random.default_rng(1)
    for round_norms in norms:
        bound = clip.next_bound(bound, clip.noised_fraction(list(round_norms), bound, 50, 50 / 20, source))
    assert float(np.mean(norms <= bound)) == pytest.approx(0.7, abs=0.08)
    assert bound == pytest.approx(np.quantile(norms, 0.7), rel=0.2)


def test_adaptive_clipping_in_dp_noised_follows_update_norms_and_shares_the_budget() -> None:
    strategy = DPNoised(
        min_sites=1,
        noise_multiplier=0.8,
        clipping_norm=5.0,
        target_quantile=0.5,
        clip_learning_rate=0.5,
        sampling="fixed",
        cohort_size=10,
    )
    bounds = [run_round(strategy, r, list(range(1, 31)), norm=0.2)["clipping-norm"] for r in range(1, 21)]
    assert bounds[0] == 5.0 and bounds[-1] < 0.5  # all norms 0.2 < C: C shrinks towards them
    z_update = update_noise_multiplier(0.8, 0.8)  # σ_b = max(10 / 20, z) = z
    assert z_update == pytest.approx((0.8**-2 - 1.6**-2) ** -0.5) and z_update > 0.8
    # The two Gaussian queries compose to one with the configured total z (dp-accounting's composition).
    both = RdpAccountant()
    both.compose(
        dp_accounting.ComposedDpEvent([dp_accounting.GaussianDpEvent(z_update), dp_accounting.GaussianDpEvent(2 * 0.8)])
    )
    one = RdpAccountant()
    one.compose(dp_accounting.GaussianDpEvent(0.8))
    assert both.get_epsilon(DELTA) == pytest.approx(one.get_epsilon(DELTA), rel=1e-6)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"sampling": "poisson"}, "needs dp-noised.cohort-size >= 1"),
        ({"target_quantile": 0.5, "clip_count_stddev": 0.4, "noise_multiplier": 1.0}, "must exceed noise-multiplier"),
        ({"noise_source": "urandom"}, "must be one of numpy, secure"),
    ],
)
def test_bad_client_dp_settings_fail_before_round_one(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DPNoised(min_sites=2, **params)


def test_draw_cohort_sizes() -> None:
    nodes = list(range(100))
    assert len(draw_cohort(nodes, "fixed", 7, SecureGaussian())) == 7
    sizes = [len(draw_cohort(nodes, "poisson", 10, np.random.default_rng(s))) for s in range(200)]
    assert np.mean(sizes) == pytest.approx(10, rel=0.1)
    assert draw_cohort(nodes, "all", 3, SecureGaussian()) == nodes


def test_secure_gaussian_is_standard_normal_and_unseeded() -> None:
    source = gaussian_source("secure")
    draws = source.normal(0.0, 3.0, 200_000)
    assert abs(np.mean(draws)) < 0.03 and np.std(draws) == pytest.approx(3.0, rel=0.01)
    assert abs(float(np.mean(draws**4)) / 81 - 3.0) < 0.1  # Gaussian kurtosis
    uniform = source.random(100_000)
    assert uniform.min() > 0 and uniform.max() < 1
    assert not np.array_equal(SecureGaussian().random(8), SecureGaussian().random(8))  # fresh OS key each time
    assert math.isfinite(float(np.max(np.abs(draws))))


def test_secure_noise_source_in_dp_noised() -> None:
    strategy = DPNoised(min_sites=1, noise_multiplier=1.0, clipping_norm=1.0, noise_source="secure")
    report = run_round(strategy, 1, [1, 2], norm=0.0)
    assert np.std(report["arrays"]["w"].numpy()) == pytest.approx(0.5, rel=0.03)
