"""Choosing a strategy: by name, by module:Class; parameters typed and checked before any round."""

from __future__ import annotations

import tomllib

import pytest
from conftest import REPO

from fedseg.config import ConfigError, RunConfig
from strategies.dp_noised import DPNoised
from strategies.fedavg import FedAvg
from strategies.registry import BUILTIN, build_strategy


def build(**values: object):
    return build_strategy(RunConfig.from_mapping(values))


def test_builtin_by_name_with_parameters() -> None:
    strategy = build(
        **{"strategy": "dp-noised", "min-sites": 3, "dp-noised.clipping-norm": 2, "fedprox.proximal-mu": 0.5}
    )  # another strategy's keys are left alone
    assert isinstance(strategy, DPNoised)
    assert (strategy.clipping_norm, strategy.noise_multiplier, strategy.min_train_nodes) == (2.0, 1.0, 3)


def test_module_class_spec() -> None:
    assert type(build(strategy="strategies.fedavg:FedAvg")) is FedAvg
    with pytest.raises(ConfigError, match=r"module 'strategies.fedavg' has no 'Nope'"):
        build(strategy="strategies.fedavg:Nope")
    with pytest.raises(ConfigError, match=r"not a subclass of strategies.base.FedSegStrategy or flwr.serverapp"):
        build(strategy="collections:OrderedDict")
    flower_fedadam = build(strategy="flwr.serverapp.strategy:FedAdam")  # a Flower class: wrapped, built-in name
    assert type(flower_fedadam) is BUILTIN["fedadam"] and type(flower_fedadam.inner).__name__ == "FedAdam"


def test_unknown_strategy_lists_installed_ones() -> None:
    with pytest.raises(
        ConfigError,
        match=r"'strategy' is 'fedsgd'; installed strategies: fedavg, fedprox, "
        r"dice-weighted, dp-noised, dp-distributed, cyclic, scaffold, fednova, fedbn, fedper, ditto, fedadam, "
        r"fedyogi, fedadagrad, fedavgm, "
        r"fedtrimmedavg, fedmedian, krum.* \(or give 'flower:<Flower strategy class>'",
    ):
        build(strategy="fedsgd")


def test_unknown_parameter_fails_listing_valid_ones() -> None:
    with pytest.raises(ConfigError) as err:
        build(**{"strategy": "fedprox", "fedprox.mu": 0.1})
    assert str(err.value).startswith(
        "strategy 'fedprox' has no parameter 'fedprox.mu'; valid parameters: "
        "fedprox.max-update-ratio (float, default 100.0"
    )
    assert "fedprox.proximal-mu (float, default 0.01, in [0, inf]" in str(err.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fedprox.proximal-mu", "high", "'fedprox.proximal-mu' must be a number, got 'high'"),
        ("fedprox.proximal-mu", -1.0, "'fedprox.proximal-mu' must be >= 0, got -1.0"),
        ("fedprox.proximal-mu", True, "'fedprox.proximal-mu' must be a number, got True"),
    ],
)
def test_ill_typed_parameter_fails(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        build(**{"strategy": "fedprox", key: value})


def test_cyclic_cycles_must_be_an_integer() -> None:
    with pytest.raises(ConfigError, match=r"'cyclic.cycles' must be an integer, got 1.5"):
        build(**{"strategy": "cyclic", "cyclic.cycles": 1.5})


def test_parameter_of_unknown_strategy_namespace_fails() -> None:
    with pytest.raises(ConfigError, match=r"'fedprx.proximal-mu': 'fedprx' is no installed strategy"):
        build(**{"strategy": "fedavg", "fedprx.proximal-mu": 0.1})


def test_pyproject_declares_every_builtin_parameter_with_its_default_inherited_ones_too() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    declared = {
        f"{name}.{key}": value
        for name, table in config.items()
        if isinstance(table, dict)
        for key, value in table.items()
    }
    own = {f"{name}.{p.name}": p.default for name, cls in BUILTIN.items() for p in cls.declared_params()}
    assert declared == own


def test_stateless_strategy_state_contract() -> None:
    strategy = build(strategy="fedavg")
    assert strategy.state_dict() == {}
    strategy.load_state_dict({})
    with pytest.raises(ValueError, match="keeps no state"):
        strategy.load_state_dict({"turn": 3})


@pytest.mark.parametrize(
    ("strategy", "key"),
    [("dice-weighted", "dice-weighted"), ("fedprox", "fedprox"), ("flower:FedProx", "flower-fedprox")],
)
def test_proximal_term_with_dp_sgd_is_refused_only_when_on(strategy: str, key: str) -> None:
    dp = {"strategy": strategy, "dp-sgd": True, "dp-noise-multiplier": 1.0}
    with pytest.raises(ConfigError, match=rf"'{key}.proximal-mu' is 0.1 but 'dp-sgd' is on: .*drops the proximal"):
        build(**dp, **{f"{key}.proximal-mu": 0.1})
    assert build(**dp, **{f"{key}.proximal-mu": 0.0}).proximal_mu == 0.0
