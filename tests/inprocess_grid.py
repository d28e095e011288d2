"""A Flower Grid whose sites are answered in this process by the real ClientApp.

Drives `Federation` without any Flower runtime (fast, deterministic), with faults on demand:
a site can hang (never answers), be killed (never answers and leaves the node list) or
tamper with its replies. Every message goes through Flower's wire encoding both ways, and
every reply is kept for audits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import app as client_app
from fedseg.config import RunConfig
from fedseg.federation import Federation
from fedseg.server_app import initial_weights
from strategies.registry import build_strategy

SUPERLINK_NODE = 1
FIRST_NODE_ID = 9000  # node ids deliberately run against the site order (site-0 has the largest)

# Tiny settings: a 3-round federation takes a few seconds on 2 cores.
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
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Server-side messages need the run/node/task identity the ServerApp runtime sets."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, SUPERLINK_NODE)


def wire(obj: Any) -> Any:
    """Deflate a message or record to the bytes Flower sends and inflate it again."""
    contents = {object_id: o.deflate() for object_id, o in get_all_nested_objects(obj).items()}
    return inflate_object_from_contents(obj.object_id, contents)


class InProcessGrid(Grid):
    """Sites 0..n-1 as nodes; `hung` nodes never answer, `killed` ones also leave the node list."""

    def __init__(self, run_config: dict[str, Any], num_sites: int, node_configs: list[dict] | None = None) -> None:
        self.contexts = {
            FIRST_NODE_ID - site: Context(
                run_id=1,
                node_id=FIRST_NODE_ID - site,
                node_config=node_configs[site] if node_configs else {"partition-id": site, "num-partitions": num_sites},
                state=RecordDict(),
                run_config=run_config,
            )
            for site in range(num_sites)
        }
        self.hung: set[int] = set()
        self.killed: set[int] = set()
        self.tamper: dict[int, Callable[[Message], Message]] = {}
        self.sent: list[list[Message]] = []  # per send_and_receive call
        self.replies: list[Message] = []
        self.before_send: Callable[[list[Message]], None] = lambda messages: None
        self._message_count = 0

    @staticmethod
    def node_of(site: int) -> int:
        return FIRST_NODE_ID - site

    def set_run(self, run: Any) -> None:  # the Federation never changes the run
        raise NotImplementedError

    @property
    def run(self) -> Any:
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError

    def get_node_ids(self) -> list[int]:
        return [node for node in self.contexts if node not in self.killed]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        messages = list(messages)
        self.before_send(messages)
        self.sent.append(messages)
        replies = []
        for message in messages:
            self._message_count += 1
            message.metadata.__dict__["_message_id"] = f"m{self._message_count}"
            node = message.metadata.dst_node_id
            if node in self.hung or node in self.killed:
                continue
            reply = client_app(wire(message), self.contexts[node])
            reply = self.tamper.get(node, lambda r: r)(reply)
            replies.append(wire(reply))
        self.replies.extend(replies)
        return replies


def tiny_config(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    """Run-config values of a tiny synthetic federation writing under tmp_path."""
    return {**TINY, "output-dir": str(tmp_path / "runs"), **overrides}


def federation(grid: InProcessGrid, values: dict[str, Any], run_dir: Path) -> Federation:
    """A Federation over `grid` with the strategy the run config names."""
    config = RunConfig.from_mapping(values)
    return Federation(grid, build_strategy(config), config, run_dir)


def run_federation(grid: InProcessGrid, values: dict[str, Any], run_dir: Path):  # noqa: ANN201
    """Run a fresh federation to the end: (final arrays, history)."""
    fed = federation(grid, values, run_dir)
    return fed.run(initial_weights(fed.config))
