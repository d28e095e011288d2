"""The installed Flower has every internal fedseg uses (fedseg.flower_compat), in the release range pyproject
pins; a Flower without them is named in one line, not met later as an AttributeError deep in a run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.app import Message, RecordDict
from packaging.requirements import Requirement
from packaging.version import Version

from fedseg import flower_compat
from fedseg.experiments.local_grid import LocalGrid, server_identity
from fedseg.flower_compat import (
    FlowerCompatibilityError,
    TaskIdentity,
    incompatibilities,
)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_installed_flower_has_every_internal_fedseg_uses() -> None:
    faults = incompatibilities()
    assert faults == [], f"Flower {flower_compat.flower_version()} is incompatible with fedseg: " + "; ".join(faults)


def test_pyproject_pins_the_tested_flower_range_and_the_installed_one_is_in_it() -> None:
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (flwr,) = [Requirement(d) for d in dependencies if Requirement(d).name == "flwr"]
    assert sorted(str(s) for s in flwr.specifier) == sorted(flower_compat.TESTED_FLOWER)
    assert Version(flower_compat.flower_version()) in flwr.specifier


def test_in_process_grid_sets_ids_and_the_server_identity_is_restored() -> None:
    before = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    grid = LocalGrid({}, [])
    with server_identity():
        message = Message(RecordDict(), dst_node_id=5, message_type="query")
        assert TaskIdentity.run_id == 1
    flower_compat.set_message_id(message, "local-7")
    assert message.metadata.message_id == "local-7"
    assert grid.run.run_id == 1
    assert (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id) == before


def test_a_flower_without_the_internals_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(TaskIdentity, "_task_id")
    assert "TaskIdentity._task_id: missing" in incompatibilities()
    with (
        pytest.raises(
            FlowerCompatibilityError,
            match=r"^Flower \S+ is not compatible with this fedseg "
            r"\(TaskIdentity has no _task_id\); fedseg is tested with "
            r"flwr>=1.41,<1.43",
        ),
        server_identity(),
    ):
        pass
    monkeypatch.setitem(flower_compat.INTERNALS, "flwr.common.constant", ("ErrorCode", "SType", "GoneInFlower9"))
    assert "flwr.common.constant.GoneInFlower9: missing" in incompatibilities()
