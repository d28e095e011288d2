"""Helpers for strategy tests: a stub grid and Flower reply messages built by hand (no runtime)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from fedseg.flower_compat import TaskIdentity


class StubGrid:
    """Just enough of a Grid for configure_train/configure_evaluate: a fixed set of node ids."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need a run/node/task identity, which the ServerApp runtime normally sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


def arrays_of(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({key: Array(np.asarray(value)) for key, value in state.items()})


def round_config() -> ConfigRecord:
    return ConfigRecord({})


def instructions(strategy: Strategy, global_state: Mapping[str, np.ndarray], nodes: list[int]) -> dict[int, Message]:
    """The train messages the strategy sends for round 1, by destination node."""
    messages = strategy.configure_train(1, arrays_of(global_state), ConfigRecord({}), StubGrid(nodes))
    return {m.metadata.dst_node_id: m for m in messages}


def reply(instruction: Message, state: Mapping[str, np.ndarray] | None, **metrics: float) -> Message:
    """A site's reply to `instruction` with the given weights (None: metrics only) and metrics."""
    content = RecordDict({"metrics": MetricRecord({k.replace("_", "-"): v for k, v in metrics.items()})})
    if state is not None:
        content["arrays"] = arrays_of(state)
    return Message(content=content, reply_to=instruction)


def as_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {key: array.numpy() for key, array in record.items()}
