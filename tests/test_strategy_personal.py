"""SCAFFOLD against client drift, FedBN's local normalisation layers, FedPer's local output stages,
Ditto's personal models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from inprocess_grid import InProcessGrid, federation, run_federation, task_identity, tiny_config
from strategy_replies import StubGrid, arrays_of, as_numpy, reply

from clients.personal import DITTO, HEAD, NORMS, SCAFFOLD, PersonalState, PersonalStateError, scaffold_update
from fedseg.cache import cache_root
from fedseg.checkpoint import resume_checkpoint
from fedseg.config import ConfigError, RunConfig
from fedseg.federation import run_key
from fedseg.models import build_model, head_state_keys, norm_state_keys
from fedseg.server_app import initial_weights
from strategies.fedavg import FedAvg
from strategies.registry import build_strategy
from strategies.scaffold import Scaffold

__all__ = ["task_identity"]  # the fixture

# ---------------------------------------------------------------------- SCAFFOLD on a drifting problem
# Site i minimises f_i(w) = ½‖A_i w − b_i‖² with very different A_i, b_i; many local SGD steps make
# FedAvg settle away from the optimum of Σ f_i (client drift); SCAFFOLD's correction removes that.
RNG = np.random.default_rng(0)
SITES = [(np.diag(RNG.uniform(0.2, 3.0, 4)) @ RNG.normal(size=(4, 4)), RNG.normal(0, 3, 4)) for _ in range(3)]
OPTIMUM = np.linalg.solve(sum(a.T @ a for a, _ in SITES), sum(a.T @ b for a, b in SITES))
STEPS, LR = 20, 0.02


def _local_sgd(a: np.ndarray, b: np.ndarray, w: np.ndarray, correction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model after the local steps and the mean raw gradient along them (what the trainer reports)."""
    total = np.zeros_like(w)
    for _ in range(STEPS):
        gradient = a.T @ (a @ w - b)
        total += gradient
        w = w - LR * (gradient + correction)
    return w, total / STEPS


def _federate(strategy: FedAvg, rounds: int) -> float:
    """Distance to the optimum of the global model after `rounds` rounds; sites keep cᵢ as clients do."""
    w = np.zeros(4, np.float32)
    variates = [torch.zeros(4) for _ in SITES]
    for server_round in range(1, rounds + 1):
        messages = list(
            strategy.configure_train(server_round, arrays_of({"w": w}), ConfigRecord({}), StubGrid([1, 2, 3]))
        )
        replies = []
        for site, (message, (a, b)) in enumerate(zip(messages, SITES, strict=True)):
            scaffold = "scaffold-c" in message.content.array_records
            c = torch.from_numpy(as_numpy(message.content["scaffold-c"])["w"]) if scaffold else torch.zeros(4)
            end, mean_gradient = _local_sgd(a, b, w.astype(np.float64), (c - variates[site]).numpy())
            end = end.astype(np.float32)
            answer = reply(message, {"w": end}, num_examples=10, site_id=site)
            if scaffold:
                updated, change = scaffold_update({"w": variates[site]}, {"w": torch.from_numpy(mean_gradient)})
                variates[site] = updated["w"]
                answer.content["scaffold-dc"] = arrays_of({"w": change["w"].numpy()})
            replies.append(answer)
        arrays, _ = strategy.aggregate_train(server_round, replies)
        w = as_numpy(arrays)["w"]
    return float(np.linalg.norm(w - OPTIMUM))


def test_scaffold_removes_the_client_drift_fedavg_has(task_identity: None) -> None:
    fedavg, scaffold = _federate(FedAvg(min_sites=3), 60), _federate(Scaffold(min_sites=3), 60)
    assert fedavg > 0.3, "the problem must make FedAvg drift"
    assert scaffold < 0.02 and scaffold < fedavg / 20, (fedavg, scaffold)


def test_scaffold_checkpoints_its_variate_and_drops_a_bad_change(task_identity: None) -> None:
    strategy = Scaffold(min_sites=2)
    global_state = {"w": np.zeros(3, np.float32), "steps": np.array([5], np.int64)}
    messages = list(strategy.configure_train(1, arrays_of(global_state), ConfigRecord({}), StubGrid([1, 2])))
    assert set(as_numpy(messages[0].content["scaffold-c"])) == {"w"}  # floating arrays only
    good = reply(messages[0], {"w": np.ones(3, np.float32), "steps": np.array([5])}, num_examples=4, site_id=0)
    good.content["scaffold-dc"] = arrays_of({"w": np.full(3, 2.0, np.float32)})
    bad = reply(messages[1], {"w": np.ones(3, np.float32), "steps": np.array([5])}, num_examples=4, site_id=1)
    bad.content["scaffold-dc"] = arrays_of({"w": np.array([1.0, np.nan, 0.0], np.float32)})
    strategy.aggregate_train(1, [good, bad])
    assert [d["site"] for d in strategy.round_report(1)["dropped-replies"]] == ["site-1"]
    np.testing.assert_array_equal(strategy.variate["w"].numpy(), [2.0, 2.0, 2.0])  # one known site: N = 1
    restored = Scaffold(min_sites=2)
    restored.load_state_dict(strategy.state_dict())
    assert restored.sites == {"site-0"} and torch.equal(restored.variate["w"], strategy.variate["w"])


def test_scaffold_variate_is_the_mean_local_gradient() -> None:
    updated, change = scaffold_update(
        {"w": torch.tensor([1.0]), "stat": torch.tensor([3.0])}, {"w": torch.tensor([0.25])}
    )
    assert updated == {"w": torch.tensor([0.25]), "stat": torch.tensor([3.0])}
    assert change["w"].item() == pytest.approx(-0.75) and change["stat"].item() == 0.0


# ---------------------------------------------------------------------- FedBN and Ditto in a federation
def _state_dir(site: int) -> Path:
    """A simulated site's state dir (clients.site_runtime.site_state_dir without node config)."""
    return cache_root() / "site-state" / f"site-{site}"


def test_fedbn_keeps_normalisation_layers_at_the_sites(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"strategy": "fedbn", "num-server-rounds": 2})
    grid = InProcessGrid(values, 2)
    final, history = run_federation(grid, values, tmp_path / "run")
    norms = norm_state_keys(build_model("unet", 1, 3))
    assert norms  # affine instance norms: there is something to keep local
    train_sends = [m for sent in grid.sent for m in sent if m.metadata.message_type == "train"]
    train_replies = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train_replies) == 4 and not any(r.has_error() for r in train_replies)
    for message in train_sends + train_replies:  # neither direction carries a normalisation layer
        assert not norms & set(message.content["arrays"]), "normalisation layers in a message"
    # the global model's normalisation layers are the initial ones; the sites' own ones differ from them
    torch.manual_seed(values["seed"])
    initial = build_model("unet", 1, 3).state_dict()
    global_state = final.to_torch_state_dict()
    assert all(torch.equal(global_state[k], initial[k]) for k in norms)
    kept = [PersonalState(_state_dir(s), run_key(tmp_path / "run")).load(NORMS) for s in range(2)]
    assert all(site is not None and set(site) == norms for site in kept)
    assert any(not torch.equal(kept[0][k], initial[k]) for k in norms)  # trained locally ...
    assert any(not torch.equal(kept[0][k], kept[1][k]) for k in norms)  # ... differently at each site
    last = history.rounds[-1].eval
    assert all("personal-dice" in site and "dice" in site for site in last.values())  # side by side


def test_fedper_keeps_each_sites_output_stage_and_averages_them_for_the_global_model(
    tmp_path: Path, task_identity: None
) -> None:
    """Round 2 trains at learning rate 0 (cosine to 0): each site's reply is exactly the model it
    started from, which must be the global model with the site's own output stage from round 1."""
    schedule = {"lr-schedule": "cosine", "lr-final-ratio": 0.0, "warmup-rounds": 0}
    values = tiny_config(tmp_path, **{"strategy": "fedper", "num-server-rounds": 2, **schedule})
    grid = InProcessGrid(values, 2)
    final, history = run_federation(grid, values, tmp_path / "run")
    head = head_state_keys(build_model("unet", 1, 3), 3)
    sent = {
        int(m.content["config"]["server-round"]): as_numpy(m.content["arrays"])
        for batch in grid.sent
        for m in batch
        if m.metadata.message_type == "train"
    }
    train = [r for r in grid.replies if r.metadata.message_type == "train"]
    assert len(train) == 4 and not any(r.has_error() for r in train)
    replies = {  # two sites a round, in round order
        (int(r.content["metrics"]["site-id"]), 1 + i // 2): as_numpy(r.content["arrays"]) for i, r in enumerate(train)
    }
    for site in range(2):
        started = replies[(site, 2)]  # learning rate 0: what the site started round 2 from
        assert all(np.array_equal(started[k], replies[(site, 1)][k]) for k in head)  # its own output stage
        assert all(np.array_equal(started[k], sent[2][k]) for k in started if k not in head)  # the global rest
        assert any(not np.array_equal(started[k], sent[2][k]) for k in head)  # not the global output stage
    kept = [PersonalState(_state_dir(s), run_key(tmp_path / "run")).load(HEAD) for s in range(2)]
    assert all(site is not None and set(site) == head for site in kept)
    global_state = final.to_torch_state_dict()  # the global output stage: the mean of the sites' own ones
    assert all(torch.allclose(global_state[k], (kept[0][k] + kept[1][k]) / 2, atol=1e-6) for k in head)
    last = history.rounds[-1].eval
    assert all(site["personal-dice"] != site["dice"] for site in last.values())
    PersonalState(_state_dir(0), run_key(tmp_path / "run")).save(HEAD, {"x": torch.zeros(2)}, 3)
    with pytest.raises(PersonalStateError, match=r"fedper-head.pt: not this model's layers; delete it"):
        PersonalState(_state_dir(0), run_key(tmp_path / "run")).load_layers(HEAD, 4, kept[1])


def test_output_stage_of_monai_networks() -> None:
    assert head_state_keys(build_model("unet", 4, 3), 3) == {
        "model.2.0.conv.weight",
        "model.2.0.conv.bias",
        "model.2.0.adn.N.weight",
        "model.2.0.adn.N.bias",
        "model.2.0.adn.A.weight",
        "model.2.1.conv.unit0.conv.weight",
        "model.2.1.conv.unit0.conv.bias",
    }
    assert head_state_keys(build_model("SegResNet", 4, 3), 3) == {"conv_final.2.conv.weight", "conv_final.2.conv.bias"}
    with pytest.raises(ValueError, match="last convolution does not produce its 5 output channels"):
        head_state_keys(build_model("unet", 4, 3), 5)


def test_fedper_refuses_a_network_without_an_output_stage_before_round_1(monkeypatch: pytest.MonkeyPatch) -> None:
    class EndsInFourChannels:
        def build(self, in_channels: int, out_channels: int) -> torch.nn.Module:
            return torch.nn.Sequential(torch.nn.Conv3d(in_channels, 8, 1), torch.nn.Conv3d(8, 4, 1))

    monkeypatch.setattr("strategies.fedper.model_spec", lambda config: EndsInFourChannels())
    with pytest.raises(
        ConfigError,
        match=r"strategy 'fedper' cannot run with model 'unet': the network's last convolution does not produce "
        r"its 3 output channels",
    ):
        build_strategy(RunConfig.from_mapping({"strategy": "fedper"}))


def test_ditto_keeps_a_personal_model_and_reports_it(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"strategy": "ditto", "ditto.lambda": 0.5, "num-server-rounds": 2})
    _, history = run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    personal = PersonalState(_state_dir(0), run_key(tmp_path / "run")).load(DITTO)
    assert personal is not None and set(personal) == set(build_model("unet", 1, 3).state_dict())
    last = history.rounds[-1].eval
    assert all(0.0 <= site["personal-dice"] <= 1.0 for site in last.values())
    assert any(site["personal-dice"] != site["dice"] for site in last.values())
    with pytest.raises(ConfigError, match="'ditto' cannot run with 'dp-sgd'"):
        build_strategy(RunConfig.from_mapping({"strategy": "ditto", "dp-sgd": True, "dp-noise-multiplier": 1.0}))
    assert PersonalState(_state_dir(0), run_key(tmp_path / "run")).load(SCAFFOLD) is None


def test_dittos_global_model_is_fedavgs_the_personal_fit_does_not_leak_into_the_reply(
    tmp_path: Path, task_identity: None
) -> None:
    """A site's reply is its global fit; the personal fit that follows it (on the same network) must
    not change the weights already taken for the reply. So Ditto's global model is FedAvg's, tensor
    for tensor, and its personal models differ from it."""
    finals = {}
    for strategy in ("fedavg", "ditto"):
        values = tiny_config(tmp_path / strategy, **{"strategy": strategy, "ditto.lambda": 0.5, "num-server-rounds": 2})
        finals[strategy], _ = run_federation(InProcessGrid(values, 2), values, tmp_path / strategy / "run")
    fedavg, ditto = (finals[s].to_torch_state_dict() for s in ("fedavg", "ditto"))
    assert set(fedavg) == set(ditto)
    assert all(torch.equal(fedavg[k], ditto[k]) for k in fedavg)
    personal = PersonalState(_state_dir(0), run_key(tmp_path / "ditto" / "run")).load(DITTO)
    assert personal is not None and any(not torch.equal(personal[k], ditto[k]) for k in ditto)


class ServerCrash(Exception):
    """Stands in for the server process dying."""


@pytest.mark.parametrize(
    "strategy, extra",
    [("scaffold", {}), ("ditto", {}), ("fedbn", {}), ("fedper", {}), ("fedavg", {"keep-optimizer-state": True})],
)
def test_a_server_dying_after_the_sites_trained_resumes_bit_identically(
    tmp_path: Path, task_identity: None, strategy: str, extra: dict[str, bool]
) -> None:
    """The sites updated their own state in round 2, the server died before its checkpoint; the
    resumed run sends round 2 again and the sites start it from the state they had the first time."""
    values = tiny_config(tmp_path, **{"strategy": strategy, "num-server-rounds": 2, **extra})
    reference, _ = run_federation(InProcessGrid(values, 2), values, tmp_path / "reference")
    grid = InProcessGrid(values, 2)

    def die_after_training(messages: list) -> None:
        if (
            messages
            and messages[0].metadata.message_type == "evaluate"
            and int(messages[0].content["config"]["server-round"]) == 2
        ):
            raise ServerCrash("server died after the sites trained round 2")

    grid.before_send = die_after_training
    with pytest.raises(ServerCrash):
        run_federation(grid, values, tmp_path / "interrupted")
    fed = federation(
        InProcessGrid(values, 2), {**values, "resume-from": str(tmp_path / "interrupted")}, tmp_path / "interrupted"
    )
    resumed, _ = fed.run(initial_weights(fed.config), resume=resume_checkpoint(fed.config))
    expected, got = reference.to_torch_state_dict(), resumed.to_torch_state_dict()
    assert all(torch.equal(got[key], expected[key]) for key in expected)
