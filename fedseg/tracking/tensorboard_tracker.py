"""TensorBoard backend: event files under `<tracking root>/tensorboard/<run name>` (`tensorboard --logdir`)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedseg.history import RoundRecord
from fedseg.tracking.base import flat_config, round_metrics

PACKAGES = ("tensorboard",)  # torch.utils.tensorboard writes the events with it


class TensorBoardTracker:
    """One event-file folder per run; a resumed run appends to the same folder."""

    def __init__(self, root: Path, run_name: str, experiment: str) -> None:
        from torch.utils.tensorboard import (
            SummaryWriter,  # optional dependency: imported when tracking is on
        )

        self.log_dir = root / "tensorboard" / run_name
        self._writer = SummaryWriter(log_dir=str(self.log_dir))
        self._experiment = experiment

    def log_config(self, config: Mapping[str, Any]) -> None:
        table = "\n".join(f"| {key} | {value} |" for key, value in flat_config(config).items())
        self._writer.add_text("config", f"experiment: {self._experiment}\n\n| key | value |\n|---|---|\n{table}")
        self._writer.add_text("config.json", f"```\n{json.dumps(dict(config), indent=1, default=str)}\n```")

    def log_round(self, record: RoundRecord) -> None:
        for name, value in round_metrics(record).items():
            self._writer.add_scalar(name, value, global_step=record.round)
        self._writer.flush()

    def close(self, failed: bool = False) -> None:
        self._writer.close()
