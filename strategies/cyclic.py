"""`cyclic`: institutional incremental learning (IIL) and cyclic IIL (CIIL), the sequential
baselines of Sheller et al. (2020, Sci. Rep.): the model visits one site per round, that site
trains it for `local-epochs`, and its trained model becomes the new global model.

Order: sites sorted by `site-id` (learned from the evaluation replies, and every run evaluates all
sites before round 1); a node not yet seen comes after the known ones, by node id. Round r
trains the site at position (r − 1) mod N, N = number of connected sites.

`cycles` = 0 repeats the cycle until the last round (CIIL); `cycles` = k stops training after
k full passes (k = 1 is IIL: each site trains exactly once; later rounds only evaluate).
If the site whose turn it is fails, that round leaves the model unchanged and the turn passes on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from logging import INFO
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid

from strategies.base import FedSegStrategy
from strategies.params import Param


class Cyclic(FedSegStrategy):
    """One site per round, in site-id order; its model is the next global model."""

    name = "cyclic"
    secure_aggregation_conflict = "it trains one site per round: the sum would be that site's update"
    params = (
        Param(
            "cycles", int, 0, "passes over all sites before training stops (0: until the last round; 1: IIL)", minimum=0
        ),
    )
    cycles: int

    def __init__(self, min_sites: int = 2, **params: Any) -> None:
        super().__init__(min_sites, **params)
        self._turn = 0
        self._site_ids: dict[int, int] = {}
        self._current: int | None = None

    def visiting_order(self, node_ids: Iterable[int]) -> list[int]:
        """Node ids in visiting order: known sites by site-id, then unknown nodes by node id."""
        return sorted(node_ids, key=lambda node: (0, self._site_ids[node]) if node in self._site_ids else (1, node))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._current = None
        messages = {m.metadata.dst_node_id: m for m in super().configure_train(server_round, arrays, config, grid)}
        if not messages:
            return []
        order = self.visiting_order(messages)
        if self.cycles and self._turn >= self.cycles * len(order):
            log(INFO, "[fedseg] cyclic: %d cycle(s) done; round %d only evaluates", self.cycles, server_round)
            return []
        node = order[self._turn % len(order)]
        self._turn += 1
        self._current = node
        return [messages[node]]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        for reply in replies:
            if not reply.has_error() and len(reply.content.metric_records) == 1:
                site = next(iter(reply.content.metric_records.values())).get("site-id")
                if isinstance(site, (int, float)) and math.isfinite(site):
                    self._site_ids[reply.metadata.src_node_id] = int(site)
        return super().aggregate_evaluate(server_round, replies)

    def round_report(self, server_round: int) -> dict[str, Any]:
        node = self._current
        trained = None if node is None else f"site-{self._site_ids[node]}" if node in self._site_ids else f"node-{node}"
        return {**super().round_report(server_round), "turn": self._turn, "trained": trained}

    def state_dict(self) -> dict[str, Any]:
        return {"turn": self._turn, "site-ids": {str(node): site for node, site in self._site_ids.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._turn = int(state["turn"])
        self._site_ids = {int(node): int(site) for node, site in state.get("site-ids", {}).items()}
