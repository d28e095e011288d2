"""Fault injection on top of fedseg's in-process LocalGrid (the real ClientApp, no Flower runtime).

Drives `Federation` fast and deterministically, with faults on demand: a site can hang (never
answers), be killed (never answers and leaves the node list) or tamper with its replies. Every
message goes through Flower's wire encoding both ways, and every reply is kept for audits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message
from flwr.server.superlink.linkstate.utils import (
    create_message_error_unavailable_res_message,
)
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from clients.client_app import app as client_app
from fedseg.config import RunConfig
from fedseg.experiments.local_grid import FIRST_SITE_NODE_ID, LocalGrid, server_identity
from fedseg.federation import Federation
from fedseg.flower_compat import set_message_id
from fedseg.server_app import initial_weights
from strategies.registry import build_strategy

# Tiny settings: a 2-round federation takes seconds on 2 cores.
TINY = {
    "synthetic-size": 24,
    "synthetic-subjects": 4,
    "patch-size": "16,16,16",
    "batch-size": 2,
    "local-epochs": 1,
    "learning-rate": 0.01,
    "seed": 3,
}


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Server-side messages need the run/node/task identity the ServerApp runtime sets."""
    with server_identity():
        yield


def wire(obj: Any) -> Any:
    """Deflate a message or record to the bytes Flower sends and inflate it again (a message keeps
    its id, which Flower sends alongside)."""
    contents = {object_id: o.deflate() for object_id, o in get_all_nested_objects(obj).items()}
    inflated = inflate_object_from_contents(obj.object_id, contents)
    if isinstance(obj, Message):
        set_message_id(inflated, obj.metadata.message_id)
    return inflated


class InProcessGrid(LocalGrid):
    """Sites 0..n-1 as nodes; `hung` nodes never answer, `killed` ones also leave the node list, for
    `unavailable` ones the SuperLink answers with an error reply (from its own node id)."""

    def __init__(self, run_config: dict[str, Any], num_sites: int, node_configs: list[dict] | None = None) -> None:
        configs = node_configs or [{"partition-id": site, "num-partitions": num_sites} for site in range(num_sites)]
        super().__init__(run_config, configs, client_app=self._answer)  # type: ignore[arg-type]
        self.hung: set[int] = set()
        self.killed: set[int] = set()
        self.unavailable: set[int] = set()
        self.tamper: dict[int, Callable[[Message], Message]] = {}
        self.sent: list[list[Message]] = []  # per send_and_receive call
        self.replies: list[Message] = []
        self.before_send: Callable[[list[Message]], None] = lambda messages: None

    @staticmethod
    def node_of(site: int) -> int:
        return FIRST_SITE_NODE_ID + site

    def get_node_ids(self) -> list[int]:
        return [node for node in super().get_node_ids() if node not in self.killed]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.before_send(messages)
        self.sent.append(messages)
        return super().send_and_receive(messages)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Messages to hung or killed nodes are accepted but never answered."""
        messages = list(messages)
        silent = {id(m) for m in messages if m.metadata.dst_node_id in self.hung | self.killed}
        for message in messages:
            if id(message) in silent:
                set_message_id(message, f"unanswered-{id(message)}")
        answered = iter(super().push_messages([m for m in messages if id(m) not in silent]))
        return [m.metadata.message_id if id(m) in silent else next(answered) for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(super().pull_messages(message_ids))
        self.replies.extend(replies)
        return replies

    def _answer(self, message: Message, context: Context) -> Message:
        if context.node_id in self.unavailable:  # the SuperLink answers for a node whose heartbeat expired
            return wire(create_message_error_unavailable_res_message(message.metadata, "node_unavail"))
        reply = client_app(wire(message), context)
        return wire(self.tamper.get(context.node_id, lambda r: r)(reply))


def tiny_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Run-config values of a tiny synthetic federation writing under tmp_path."""
    return {**TINY, "output-dir": str(tmp_path / "runs"), **overrides}


def federation(grid: InProcessGrid, values: dict[str, Any], run_dir: Path) -> Federation:
    """A Federation over `grid` with the strategy the run config names."""
    config = RunConfig.from_mapping(values)
    return Federation(grid, build_strategy(config), config, run_dir)


def run_federation(grid: InProcessGrid, values: dict[str, Any], run_dir: Path):
    """Run a fresh federation to the end: (final arrays, history)."""
    fed = federation(grid, values, run_dir)
    return fed.run(initial_weights(fed.config))
