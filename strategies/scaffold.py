"""`scaffold`: FedAvg with control variates that correct each site's drift (Karimireddy et al. 2020,
SCAFFOLD: stochastic controlled averaging for federated learning).

The server keeps a control variate c (one tensor per floating array of the model, zero at first)
and sends it with every train instruction; a site adds c − cᵢ to each gradient, updates its own cᵢ
(kept in its state dir, clients.personal) and replies with Δcᵢ beside its model. The server averages
the models (examples-weighted, as FedAvg) and sets c ← c + (1/N)·Σ Δcᵢ over the good replies, with N
the number of sites that ever took part: a dropped site's cᵢ stays as it was, so its share of c does
too, and a rejoining site continues from its own cᵢ. c and the known sites are checkpointed, so a
resumed run goes on exactly. Replies are twice the size of FedAvg's (model + Δcᵢ).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedseg.messages import SCAFFOLD_C, SCAFFOLD_DC
from strategies.aggregate import array_view
from strategies.base import Reply
from strategies.fedavg import FedAvg


class Scaffold(FedAvg):
    """FedAvg with server and site control variates against client drift."""

    name = "scaffold"
    reply_records = (SCAFFOLD_DC,)
    dp_sgd_conflict = "its gradient correction is replaced by Opacus' clipped, noised gradient"

    def __init__(self, min_sites: int = 2, **params: Any) -> None:
        super().__init__(min_sites=min_sites, **params)
        self.variate: dict[str, torch.Tensor] = {}
        self.sites: set[str] = set()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if not self.variate:
            self.variate = {
                key: torch.zeros(view.shape, dtype=torch.float32)
                for key, view in ((k, array_view(a)) for k, a in arrays.items())
                if np.issubdtype(view.dtype, np.floating)
            }
        messages = list(super().configure_train(server_round, arrays, config, grid))
        record = ArrayRecord(self.variate)
        for message in messages:
            message.content[SCAFFOLD_C] = record
        return messages

    def check_reply(self, reply: Reply) -> str:
        """Δcᵢ must have c's keys and shapes and finite values."""
        change = reply.message.content.array_records.get(SCAFFOLD_DC) if reply.message is not None else None
        if change is None or set(change) != set(self.variate):
            return f"'{SCAFFOLD_DC}' must hold the control variate's {len(self.variate)} arrays"
        for key, array in change.items():
            view = array_view(array)
            if view.shape != tuple(self.variate[key].shape) or not np.isfinite(view).all():
                return f"'{SCAFFOLD_DC}' array '{key}' is not finite or has the wrong shape {list(view.shape)}"
        return ""

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        """FedAvg of the good replies' models; c moves by their Δcᵢ / N."""
        self._update_variate(replies)
        return super().combine(server_round, replies)

    def _update_variate(self, replies: list[Reply]) -> None:
        self.sites.update(reply.site for reply in replies)
        scale = 1.0 / max(len(self.sites), 1)
        for reply in replies:
            assert reply.message is not None  # check_reply has read its Δcᵢ
            for key, array in reply.message.content.array_records[SCAFFOLD_DC].items():
                self.variate[key] += scale * torch.from_numpy(array_view(array).astype(np.float32))

    def state_dict(self) -> dict[str, Any]:
        return {"variate": dict(self.variate), "sites": sorted(self.sites)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.variate = {key: value.clone() for key, value in state["variate"].items()}
        self.sites = set(state["sites"])

    def round_report(self, server_round: int) -> dict[str, Any]:
        norm = math.sqrt(sum(float((v * v).sum()) for v in self.variate.values()))
        return {**super().round_report(server_round), "control-variate-norm": norm, "sites-known": len(self.sites)}
