"""Faults: a site that hangs or dies does not stall the run; garbage replies never reach the model."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message
from flwr.server.superlink.linkstate.utils import NODE_UNAVAILABLE_ERROR_REASON
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config

from fedseg.federation import FederationError

__all__ = ["task_identity"]  # the fixture


def on_first_train(grid: InProcessGrid, action) -> None:
    """Call `action(round)` just before the train messages of each round are sent."""

    def before_send(messages: list[Message]) -> None:
        if messages and messages[0].metadata.message_type == "train":
            action(int(messages[0].content["config"]["server-round"]))

    grid.before_send = before_send


def sent_sites(grid: InProcessGrid, call: int) -> set[int]:
    """Sites (by number) that the `call`-th send_and_receive addressed."""
    return {m.metadata.dst_node_id - grid.node_of(0) for m in grid.sent[call]}


def test_hung_then_killed_sites_are_dropped_and_the_run_completes(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 2, "min-sites": 3, "round-timeout": 5.0})
    grid = InProcessGrid(values, 3)
    on_first_train(grid, lambda server_round: grid.hung.add(grid.node_of(2)))  # hangs mid-round 1, stays connected
    evaluations = iter(range(1, 100))

    def leave_after_round_one(reply: Message) -> Message:
        """site-1 answers round 1, then its node is gone (min-sites 3 would make Flower wait forever)."""
        if reply.metadata.message_type == "evaluate" and next(evaluations) == 2:
            grid.killed.add(grid.node_of(1))
        return reply

    grid.tamper[grid.node_of(1)] = leave_after_round_one
    final, history = run_federation(grid, values, tmp_path / "run")

    # sends: round 0 eval, round 1 train + eval, round 2 train + eval
    assert [sent_sites(grid, call) for call in range(5)] == [{0, 1, 2}, {0, 1, 2}, {0, 1}, {0}, {0}]
    round1, round2 = history.rounds[1], history.rounds[2]
    assert round1.dropped == ["site-2"]
    assert round1.failures == [{"site": "site-2", "stage": "train", "reason": "no reply within round-timeout (5 s)"}]
    assert set(round1.train) == {"site-0", "site-1"}
    assert round2.dropped == ["site-1"]
    assert round2.failures == [{"site": "site-1", "stage": "train", "reason": "disconnected from the SuperLink"}]
    assert set(round2.eval) == {"site-0"}
    assert all(torch.isfinite(t.float()).all() for t in final.to_torch_state_dict().values())


def test_too_few_live_sites_stops_the_run_with_a_clear_error(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 2, "min-live-sites": 2, "round-timeout": 0.2})
    grid = InProcessGrid(values, 2)
    on_first_train(grid, lambda server_round: grid.hung.add(grid.node_of(1)))
    expected = (
        r"only 1 live site\(s\) after waiting 0.2 s \(round-timeout\); "
        r"run-config 'min-live-sites' needs 2; dropped: site-1"
    )
    with pytest.raises(FederationError, match=expected):
        run_federation(grid, values, tmp_path / "run")


def with_arrays(reply: Message, change) -> Message:
    """The reply with its weights replaced by `change(state_dict)`."""
    state = reply.content["arrays"].to_torch_state_dict()
    reply.content["arrays"] = ArrayRecord(change(state))
    return reply


def nan_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.items()}


def wrong_shape(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(k for k, v in state.items() if v.ndim == 5 and v.shape[0] > 1)
    return {**state, key: state[key][:-1].clone()}


def test_garbage_replies_never_reach_the_global_model(
    tmp_path: Path, task_identity: None, caplog: pytest.LogCaptureFixture
) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 2})
    grid = InProcessGrid(values, 2)
    garbage = iter([nan_weights, wrong_shape])
    grid.tamper[grid.node_of(1)] = lambda reply: (
        with_arrays(reply, next(garbage)) if reply.metadata.message_type == "train" else reply
    )
    with caplog.at_level(logging.WARNING):
        final, history = run_federation(grid, values, tmp_path / "run")

    state = final.to_torch_state_dict()
    assert all(torch.isfinite(t.float()).all() for t in state.values())
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in grid.replies[2].content["arrays"].to_torch_state_dict().items()
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("site-1" in w and "non-finite" in w for w in warnings), warnings
    assert any("site-1" in w and "the global model has" in w for w in warnings), warnings
    assert not any("site-0" in w for w in warnings), warnings
    # The bad site's own evaluation still counts (it answered); only its weights were refused.
    assert set(history.rounds[-1].eval) == {"site-0", "site-1"}
    assert np.isfinite(history.final_dice)


def test_a_restarted_site_rejoins_but_a_hung_one_is_not_retried(tmp_path: Path, task_identity: None) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 3, "min-sites": 3, "round-timeout": 5.0})
    grid = InProcessGrid(values, 3)

    def faults(server_round: int) -> None:
        if server_round == 1:  # site-1's SuperNode dies, site-2 hangs but stays connected
            grid.killed.add(grid.node_of(1))
            grid.hung.add(grid.node_of(2))
        if server_round == 2:  # site-1 is restarted while round 2 trains (same node id, as with node auth)
            grid.killed.discard(grid.node_of(1))

    on_first_train(grid, faults)
    _, history = run_federation(grid, values, tmp_path / "run")

    # sends: round 0 eval, round 1 train + eval, ...; site-1 answers the probe sent at round 2's
    # evaluation and trains again from round 3; hung site-2 never answers its probe
    assert [sent_sites(grid, call) for call in range(7)] == [{0, 1, 2}, {0, 1, 2}, {0}, {0}, {0}, {0, 1}, {0, 1}]
    assert history.rounds[1].dropped == ["site-1", "site-2"]
    assert [r.rejoined for r in history.rounds] == [[], [], [], ["site-1"]]
    assert set(history.rounds[3].train) == {"site-0", "site-1"} == set(history.rounds[3].eval)
    probes = [r for r in grid.replies if r.metadata.message_type == "query"]
    assert [(r.metadata.src_node_id, dict(r.content["metrics"])) for r in probes] == [(grid.node_of(1), {"site-id": 1})]


def test_an_error_reply_from_the_superlink_is_charged_to_the_site_it_stands_for(
    tmp_path: Path, task_identity: None
) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 1, "min-sites": 2})
    grid = InProcessGrid(values, 2)
    on_first_train(grid, lambda server_round: grid.unavailable.add(grid.node_of(1)))
    _, history = run_federation(grid, values, tmp_path / "run")
    assert history.rounds[1].dropped == ["site-1"]
    assert history.rounds[1].failures == [{"site": "site-1", "stage": "train", "reason": NODE_UNAVAILABLE_ERROR_REASON}]
    assert set(history.rounds[1].train) == set(history.rounds[1].eval) == {"site-0"}
