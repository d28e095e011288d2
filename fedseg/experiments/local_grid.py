"""A Flower Grid that answers each site in this process with the real ClientApp.

The experiment runner drives `fedseg.federation.Federation` through it: the same round loop,
strategies and client code as `flwr run`, without starting a Flower runtime for every arm.
Each node is one site, given to the ClientApp as node_config {"data-dir", "site-id"}, exactly
as a deployed SuperNode names its data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from itertools import count
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

from clients.client_app import app as default_client_app
from fedseg import flower_compat
from fedseg.flower_compat import Run

RUN_ID = 1
SERVER_NODE_ID = 1
FIRST_SITE_NODE_ID = 100


class LocalGrid(Grid):
    """Nodes FIRST_SITE_NODE_ID, +1, ... answered in order by `client_app` with their own Context."""

    def __init__(
        self,
        run_config: Mapping[str, Any],
        node_configs: Iterable[Mapping[str, Any]],
        client_app: ClientApp = default_client_app,
    ) -> None:
        self.client_app = client_app
        self.contexts = {
            node: Context(
                run_id=RUN_ID, node_id=node, node_config=dict(config), state=RecordDict(), run_config=dict(run_config)
            )
            for node, config in zip(count(FIRST_SITE_NODE_ID), node_configs)
        }
        self._ids = count(1)
        self._replies: dict[str, Message] = {}
        self._run = flower_compat.empty_run(RUN_ID)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Deliver each message to its node's ClientApp now; its reply waits for `pull_messages`."""
        ids = []
        for message in messages:
            message_id = f"local-{next(self._ids)}"
            flower_compat.set_message_id(message, message_id)
            node = message.metadata.dst_node_id
            if node not in self.contexts:
                raise KeyError(f"LocalGrid has no node {node}; nodes: {self.get_node_ids()}")
            self._replies[message_id] = self.client_app(message, self.contexts[node])
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """The replies that arrived for these message ids (each handed out once)."""
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver the messages and return their replies in order (the timeout is moot)."""
        return list(self.pull_messages(self.push_messages(messages)))


def server_identity() -> AbstractContextManager[None]:
    """Give this process the ServerApp identity that new Messages need (as the Flower runtime does)."""
    return flower_compat.server_identity(RUN_ID, SERVER_NODE_ID)
