"""MLflow backend: a local store `<tracking root>/mlflow.db` (SQLite, MLflow's local backend; the plain-folder
store is in maintenance mode since MLflow 3), or the server named by $MLFLOW_TRACKING_URI.

One MLflow run per fedseg run (tag `fedseg.run`); a resumed run continues the same MLflow run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedseg.history import RoundRecord
from fedseg.tracking.base import flat_config, round_metrics

PACKAGES = ("mlflow",)  # mlflow-skinny is enough (no server); `mlflow ui` needs the full package
RUN_TAG = "fedseg.run"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
BATCH = 100  # params per log_batch call (MLflow's limit)


def tracking_uri(root: Path) -> str:
    """$MLFLOW_TRACKING_URI when set, else the SQLite store in the tracking root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / 'mlflow.db'}"


class MLflowTracker:
    """Logs to one MLflow run, found again by its `fedseg.run` tag when the fedseg run resumes."""

    def __init__(self, root: Path, run_name: str, experiment: str) -> None:
        from mlflow.tracking import (
            MlflowClient,  # optional dependency: imported when tracking is on
        )

        root.mkdir(parents=True, exist_ok=True)
        self.uri = tracking_uri(root)
        self._client = client = MlflowClient(self.uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found
            else client.create_experiment(experiment, artifact_location=(root / "mlflow-artifacts").resolve().as_uri())
        )
        runs = client.search_runs([experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{run_name}'", max_results=1)
        run = runs[0] if runs else client.create_run(experiment_id, run_name=run_name, tags={RUN_TAG: run_name})
        self.run_id = run.info.run_id
        if runs:
            client.update_run(self.run_id, status="RUNNING")
        self._logged_params = dict(run.data.params)  # a resumed run keeps its first values (MLflow refuses changes)

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        params = [
            Param(key, value[:MAX_PARAM_CHARS])
            for key, value in flat_config(config).items()
            if key not in self._logged_params
        ]
        for start in range(0, len(params), BATCH):
            self._client.log_batch(self.run_id, params=params[start : start + BATCH])
        self._logged_params.update({param.key: param.value for param in params})

    def log_round(self, record: RoundRecord) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, value, now, record.round) for name, value in round_metrics(record).items()]
        for start in range(0, len(metrics), 1000):
            self._client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def close(self, failed: bool = False) -> None:
        self._client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
