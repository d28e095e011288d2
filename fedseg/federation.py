"""The round loop: send, collect per-site replies, aggregate with the strategy, record, checkpoint.

fedseg runs its own loop over a Flower strategy's configure/aggregate hooks (instead of
`Strategy.start`) so that it can keep per-site metrics and failures in history.json and
write the run folder after every round.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedseg.config import RunConfig
from fedseg.history import History, RoundRecord


@dataclass
class Federation:
    """One federated run of `strategy` over the sites reachable through `grid`."""

    grid: Grid
    strategy: Strategy
    config: RunConfig
    run_dir: Path

    def run(self, initial: ArrayRecord) -> tuple[ArrayRecord, History]:
        """Evaluate the initial model, then train and evaluate for num-server-rounds."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._site_names: dict[int, str] = {}
        history = History(config=self.config.to_dict())
        arrays = initial
        history.rounds.append(self._evaluate(0, arrays, RoundRecord(round=0)))
        self._report(history.rounds[-1])
        for server_round in range(1, self.config.num_server_rounds + 1):
            started = time.perf_counter()
            record = RoundRecord(round=server_round)
            arrays = self._train(server_round, arrays, record)
            self._evaluate(server_round, arrays, record)
            record.seconds = time.perf_counter() - started
            history.rounds.append(record)
            history.save(self.run_dir / "history.json")
            save_model(arrays, self.run_dir / "model.pt")
            self._report(record)
        return arrays, history

    def _train(self, server_round: int, arrays: ArrayRecord, record: RoundRecord) -> ArrayRecord:
        config = ConfigRecord(
            {"local-epochs": self.config.local_epochs, "learning-rate": self.config.learning_rate}
        )
        replies = self._send(self.strategy.configure_train(server_round, arrays, config, self.grid))
        record.train = self._collect(replies, "train", record)
        new_arrays, _ = self.strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            log(WARNING, "round %d: no usable training reply; the global model is unchanged", server_round)
            return arrays
        return new_arrays

    def _evaluate(self, server_round: int, arrays: ArrayRecord, record: RoundRecord) -> RoundRecord:
        replies = self._send(self.strategy.configure_evaluate(server_round, arrays, ConfigRecord(), self.grid))
        record.eval = self._collect(replies, "evaluate", record)
        self.strategy.aggregate_evaluate(server_round, replies)
        return record

    def _send(self, messages: Iterable[Message]) -> list[Message]:
        return list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout))

    def _collect(self, replies: list[Message], stage: str, record: RoundRecord) -> dict[str, dict[str, float]]:
        """Per-site metrics of good replies; failures recorded with the site's reason."""
        per_site: dict[str, dict[str, float]] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                site = self._site_names.get(node, f"node-{node}")
                record.failures.append({"site": site, "stage": stage, "reason": str(reply.error.reason)})
                log(WARNING, "%s: %s failed: %s", site, stage, reply.error.reason)
                continue
            metrics = dict(next(iter(reply.content.metric_records.values())))
            site = f"site-{int(metrics.get('site-id', node))}"
            self._site_names[node] = site
            per_site[site] = {k: float(v) for k, v in metrics.items() if not isinstance(v, list)}
        return dict(sorted(per_site.items()))

    @staticmethod
    def _report(record: RoundRecord) -> None:
        sites = "  ".join(f"{name} {m['dice']:.3f}" for name, m in record.eval.items())
        loss = "" if record.round == 0 else f"  train-loss {record.train_loss:.3f}"
        log(INFO, "[fedseg] round %d  Dice: %s  | mean %.3f%s", record.round, sites, record.mean_dice, loss)


def save_model(arrays: ArrayRecord, path: Path) -> None:
    """Write the global weights as a torch state dict, atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(arrays.to_torch_state_dict(), tmp)
    tmp.replace(path)
