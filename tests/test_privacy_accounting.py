"""DP-SGD accounting: fedseg's ε equals Opacus' and dp-accounting's; target-ε noise; config; summary."""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedseg.config import ConfigError, RunConfig
from fedseg.privacy import DPSettings, PrivacyLedger, SitePrivacy, epsilon_of, privacy_summary

DELTA = 1e-5


def dp_accounting_epsilon(accountant: RdpAccountant | PLDAccountant, sigma: float, rate: float, steps: int) -> float:
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(DELTA)


def test_rdp_epsilon_matches_opacus_and_dp_accounting() -> None:
    sigma, rate, steps = 2.0, 0.1, 300
    opacus = RDPAccountant()
    for _ in range(steps):
        opacus.step(noise_multiplier=sigma, sample_rate=rate)
    ours = epsilon_of([(sigma, rate, steps)], DELTA)
    assert ours == opacus.get_epsilon(DELTA)
    # Google's dp-accounting over the same RDP orders: the same bound (fractional orders are
    # evaluated by a different series, hence the small tolerance).
    reference = dp_accounting_epsilon(RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS), sigma, rate, steps)
    assert ours == pytest.approx(reference, rel=1e-4)
    assert 4.0 < ours < 5.0


def test_prv_epsilon_matches_dp_accounting_pld() -> None:
    sigma, rate, steps = 1.1, 0.25, 80
    ours = epsilon_of([(sigma, rate, steps)], DELTA, accountant="prv")
    assert ours == pytest.approx(dp_accounting_epsilon(PLDAccountant(), sigma, rate, steps), rel=1e-2)
    assert ours < epsilon_of([(sigma, rate, steps)], DELTA, accountant="rdp")  # PRV is the tighter bound


def test_history_of_several_rounds_composes() -> None:
    one_round = (1.0, 1 / 3, 6)
    assert epsilon_of([one_round, one_round], DELTA) == pytest.approx(epsilon_of([(1.0, 1 / 3, 12)], DELTA))
    assert epsilon_of([], DELTA) == 0.0


def test_target_epsilon_mode_spends_the_budget_over_the_planned_epochs() -> None:
    settings = DPSettings(noise_multiplier=0.0, max_grad_norm=1.0, delta=DELTA, target_epsilon=3.0, planned_epochs=6)
    rate, steps_per_epoch = 1 / 3, 3
    sigma = settings.noise_for(rate, steps_per_epoch)
    assert sigma == get_noise_multiplier(target_epsilon=3.0, target_delta=DELTA, sample_rate=rate, steps=18)
    spent = epsilon_of([(sigma, rate, 6 * steps_per_epoch)], DELTA)
    assert 2.95 <= spent <= 3.0
    assert epsilon_of([(sigma, rate, 7 * steps_per_epoch)], DELTA) > 3.0  # one epoch more would exceed it
    fixed = DPSettings(noise_multiplier=1.3, max_grad_norm=1.0, delta=DELTA, target_epsilon=3.0, planned_epochs=6)
    assert fixed.noise_for(rate, steps_per_epoch) == 1.3


def test_ledger_persists_epsilon_across_processes(tmp_path: Path) -> None:
    settings = DPSettings(noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA)
    ledger = PrivacyLedger(tmp_path / "site" / "privacy" / "run-7.json")
    ledger.save([(1.0, 0.5, 8)])
    assert SitePrivacy(settings, ledger).epsilon == epsilon_of([(1.0, 0.5, 8)], DELTA)
    ledger.path.write_text("{not json")
    with pytest.raises(ValueError, match="unreadable privacy ledger"):
        SitePrivacy(settings, ledger)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dp-sgd": True}, "neither 'dp-noise-multiplier' nor 'dp-target-epsilon' is > 0"),
        ({"dp-delta": 1.0}, "'dp-delta' must be in (0, 1), got 1.0"),
        ({"dp-max-grad-norm": 0.0}, "'dp-max-grad-norm' must be > 0"),
        ({"dp-accountant": "gdp"}, "'dp-accountant' is 'gdp'; choose one of: rdp, prv"),
        ({"dp-sgd": "yes"}, "'dp-sgd' must be true or false, got 'yes'"),
    ],
)
def test_bad_dp_config_is_rejected(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert message in str(err.value)


def test_dp_settings_from_config() -> None:
    assert DPSettings.from_config(RunConfig.from_mapping({})) is None
    config = RunConfig.from_mapping(
        {"dp-sgd": True, "dp-target-epsilon": 8.0, "num-server-rounds": 5, "local-epochs": 3, "dp-delta": 1e-4}
    )
    settings = DPSettings.from_config(config)
    assert settings == DPSettings(
        noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-4, target_epsilon=8.0, accountant="rdp", planned_epochs=15
    )


def test_summary_names_both_guarantees_in_plain_words() -> None:
    history = {
        "rounds": [
            {
                "round": 1,
                "train": {"site-0": {"dp-epsilon": 1.5, "dp-delta": 1e-5}},
                "strategy": {"epsilon": 0.8, "delta": 1e-5},
                "failures": [],
            },
            {
                "round": 2,
                "train": {"site-0": {"dp-epsilon": 2.25, "dp-delta": 1e-5}},
                "strategy": {"epsilon": 1.2, "delta": 1e-5},
                "failures": [{"site": "site-1", "stage": "train", "reason": "privacy budget reached"}],
            },
        ]
    }
    lines = privacy_summary(history)
    assert lines[0].startswith("client-level DP (dp-noised): ε = 1.20 at δ = 1e-05; protects each whole site")
    assert lines[1].startswith("sample-level DP-SGD, site-0: ε = 2.25 at δ = 1e-05; protects each training subject")
    assert lines[2] == "site-1 stopped training in round 2: privacy budget reached"
    assert privacy_summary({"rounds": [{"round": 1, "train": {"site-0": {"dice": 0.5}}}]}) == []
