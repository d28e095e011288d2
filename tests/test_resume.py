"""A run interrupted after any round and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from inprocess_grid import InProcessGrid, federation, run_federation, task_identity, tiny_config

from fedseg.checkpoint import CHECKPOINT_FILE, check_resumable, load_checkpoint, resume_checkpoint
from fedseg.config import ConfigError, RunConfig
from fedseg.flower_compat import Run, empty_run
from fedseg.history import History
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.server_app import initial_weights
from fedseg.software import flower_app, software_versions

__all__ = ["task_identity"]  # the fixture

ROUNDS = 2


class ServerCrash(Exception):
    """Stands in for the server process dying."""


def crash_in_round(grid: InProcessGrid, server_round: int) -> None:
    """Make the grid raise when the train messages of `server_round` are sent."""

    def before_send(messages: list) -> None:
        if (
            messages
            and messages[0].metadata.message_type == "train"
            and int(messages[0].content["config"]["server-round"]) == server_round
        ):
            raise ServerCrash(f"server died in round {server_round}")

    grid.before_send = before_send


@pytest.mark.parametrize("swa_rounds", [0, ROUNDS])
def test_resumed_run_is_bit_identical(tmp_path: Path, task_identity: None, swa_rounds: int) -> None:
    """Also with a final model averaged over both rounds: the resumed run's average holds round 1's model
    only if the checkpoint kept it."""
    values = tiny_config(tmp_path, **{"num-server-rounds": ROUNDS, "swa-rounds": swa_rounds})
    reference, reference_history = run_federation(InProcessGrid(values, 2), values, tmp_path / "reference")

    interrupted_dir = tmp_path / "interrupted"
    grid = InProcessGrid(values, 2)
    crash_in_round(grid, 2)
    with pytest.raises(ServerCrash):
        run_federation(grid, values, interrupted_dir)
    assert load_checkpoint(interrupted_dir).round == 1
    # A new server process: fresh strategy, fresh random state, fresh grid.
    random.seed(12345)
    torch.manual_seed(12345)
    resumed_values = {**values, "resume-from": str(interrupted_dir)}
    fed = federation(InProcessGrid(values, 2), resumed_values, interrupted_dir)
    resumed, history = fed.run(initial_weights(fed.config), resume=resume_checkpoint(fed.config))

    reference_state, resumed_state = reference.to_torch_state_dict(), resumed.to_torch_state_dict()
    assert list(resumed_state) == list(reference_state)
    for key, tensor in reference_state.items():
        assert torch.equal(resumed_state[key], tensor), key
    assert [r.round for r in history.rounds] == list(range(ROUNDS + 1))
    assert dice_by_round(history) == dice_by_round(reference_history)
    saved = json.loads((interrupted_dir / "history.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == list(range(ROUNDS + 1))
    on_disk = ModelCheckpoint.load(interrupted_dir / "model.pt").state_dict
    assert all(torch.equal(on_disk[k], reference_state[k]) for k in reference_state)


def test_history_records_the_software_and_a_resume_under_other_versions(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": ROUNDS})
    grid = InProcessGrid(values, 2)
    crash_in_round(grid, 2)
    with pytest.raises(ServerCrash):
        run_federation(grid, values, tmp_path / "same")
    started = json.loads((tmp_path / "same" / "history.json").read_text())["software"]
    assert started == [{"from-round": 1, **software_versions()}]
    assert started[0]["torch"] == version("torch") and started[0]["flwr"] == version("flwr")
    assert started[0]["torch-threads"] == str(torch.get_num_threads())
    shutil.copytree(tmp_path / "same", tmp_path / "upgraded")

    def resume(run_dir: Path) -> list[dict[str, str]]:
        fed = federation(InProcessGrid(values, 2), {**values, "resume-from": str(run_dir)}, run_dir)
        fed.run(initial_weights(fed.config), resume=resume_checkpoint(fed.config))
        return json.loads((run_dir / "history.json").read_text())["software"]

    assert resume(tmp_path / "same") == started  # resumed under the same software: still one entry
    upgraded = {**software_versions(), "torch": "9.9.9"}
    monkeypatch.setattr("fedseg.software.software_versions", lambda: upgraded)
    assert resume(tmp_path / "upgraded") == [*started, {"from-round": 2, **upgraded}]  # round 2 under the others


def test_history_records_the_flower_app_a_run_was_started_from(tmp_path: Path, task_identity: None) -> None:
    """`flwr run` hands the ServerApp a Run naming its FAB; a resume from another FAB adds an entry."""
    values = tiny_config(tmp_path, **{"num-server-rounds": ROUNDS})

    def grid_of(fab_hash: str) -> InProcessGrid:
        grid = InProcessGrid(values, 2)
        grid.set_run(dataclasses.replace(empty_run(1), fab_id="fedseg/fedseg", fab_version="0.1.0", fab_hash=fab_hash))
        return grid

    first, second = "a1" * 32, "b2" * 32
    grid = grid_of(first)
    crash_in_round(grid, 2)
    with pytest.raises(ServerCrash):
        run_federation(grid, values, tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "same")

    def resume(run_dir: Path, fab_hash: str) -> list[dict[str, str]]:
        fed = federation(grid_of(fab_hash), {**values, "resume-from": str(run_dir)}, run_dir)
        fed.run(initial_weights(fed.config), resume=resume_checkpoint(fed.config))
        return json.loads((run_dir / "history.json").read_text())["software"]

    assert [e["flower-app"] for e in resume(tmp_path / "same", first)] == [f"sha256:{first} fedseg/fedseg 0.1.0"]
    software = resume(tmp_path / "run", second)
    assert [(e["from-round"], e["flower-app"]) for e in software] == [
        (1, f"sha256:{first} fedseg/fedseg 0.1.0"),
        (2, f"sha256:{second} fedseg/fedseg 0.1.0"),
    ]
    assert software[1] == {**software[0], "from-round": 2, "flower-app": f"sha256:{second} fedseg/fedseg 0.1.0"}


def test_a_grid_without_a_flower_run_records_no_app(tmp_path: Path) -> None:
    """An experiment's in-process grid holds an empty Run; a Flower grid before its runtime set one raises."""

    class Unset(InProcessGrid):
        @property
        def run(self) -> Run:
            raise TypeError("vars() argument must have __dict__ attribute")  # InMemoryGrid, HttpGrid with no Run

    values = tiny_config(tmp_path)
    assert flower_app(InProcessGrid(values, 2)) == {}
    assert flower_app(Unset(values, 2)) == {}


def dice_by_round(history: History) -> list[dict[str, float]]:
    return [{site: metrics["dice"] for site, metrics in r.eval.items()} for r in history.rounds]


def test_checkpoint_holds_round_weights_strategy_rng_and_history(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 1})
    final, history = run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run")
    assert checkpoint.round == 1
    assert set(checkpoint.rng_state) == {"python", "numpy", "torch"}
    assert checkpoint.site_names == {InProcessGrid.node_of(0): "site-0", InProcessGrid.node_of(1): "site-1"}
    assert isinstance(checkpoint.strategy_state, dict)
    assert checkpoint.history.to_dict() == history.to_dict()
    saved, expected = checkpoint.arrays.to_torch_state_dict(), final.to_torch_state_dict()
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert not list((tmp_path / "run").glob(".*.tmp")), "no temporary files left behind"


def test_resume_rejects_a_changed_config(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 1})
    run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    changed = RunConfig.from_mapping({**values, "learning-rate": 0.5, "resume-from": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match=r"'learning-rate' was 0.01, now 0.5"):
        resume_checkpoint(changed)
    more_rounds = RunConfig.from_mapping({**values, "num-server-rounds": 4, "resume-from": str(tmp_path / "run")})
    assert resume_checkpoint(more_rounds).round == 1


def test_resume_from_a_folder_without_checkpoint_names_the_file(tmp_path: Path) -> None:
    config = RunConfig.from_mapping({"resume-from": str(tmp_path)})
    with pytest.raises(ConfigError, match=f"{tmp_path / CHECKPOINT_FILE} not found"):
        resume_checkpoint(config)


def test_a_checkpoint_from_before_a_new_key_resumes_with_its_default(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 1})
    run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    checkpoint = load_checkpoint(tmp_path / "run")
    del checkpoint.history.config["swa-rounds"]  # written by a fedseg without that key
    check_resumable(checkpoint, RunConfig.from_mapping({**values, "num-server-rounds": 2}), tmp_path / "run")
    with pytest.raises(ConfigError, match="'swa-rounds' was 0, now 1"):
        check_resumable(checkpoint, RunConfig.from_mapping({**values, "swa-rounds": 1}), tmp_path / "run")
