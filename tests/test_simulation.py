"""End to end: `fedseg run` (which runs `flwr run`) trains across simulated sites and writes the run folder
where the caller expects it, with its trackers; `fedseg predict` uses its model; a bad run config fails
before training."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from conftest import REPO, TINY_RUN, read_history
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from fedseg.cli import app as cli
from fedseg.data.synth import write_site
from fedseg.local_superlink import run_config_value, this_bin_dir
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.tracking.mlflow_tracker import tracking_uri


def test_fedseg_run_trains_two_sites_below_the_callers_folder(tmp_path: Path, local_superlink: Path) -> None:
    """The session's local SuperLink runs in its own folder; `fedseg run` from a second folder writes below
    that second folder (the default output-dir "runs"), not the SuperLink's."""
    caller = tmp_path / "caller"
    caller.mkdir()
    run_config = {**TINY_RUN, "num-server-rounds": 2, "tracking": "tensorboard,mlflow"}
    overrides = " ".join(f"{key}={run_config_value(value)}" for key, value in run_config.items())
    command = [str(this_bin_dir() / "fedseg"), "run", str(REPO), "--run-config", overrides]
    command += ["--federation-config", "num-supernodes=2 client-resources-num-cpus=1"]
    result = subprocess.run(command, cwd=caller, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    output = caller / "runs"
    assert f"output-dir: {output}" in result.stdout
    history = read_history(output, result)
    assert not (local_superlink / "runs").exists()
    assert f"folder {local_superlink}" in result.stdout  # the ServerApp ran in the SuperLink's folder and says so
    rounds = history["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert set(rounds[-1]["eval"]) == {"site-0", "site-1"}
    assert rounds[-1]["failures"] == []
    # Initial random model vs the federated model after two rounds: training must help.
    assert rounds[-1]["mean_dice"] > rounds[0]["mean_dice"] + 0.1
    assert all(site["train-loss"] > 0 for site in rounds[-1]["train"].values())
    run_dir = next(output.glob("*/history.json")).parent
    state = ModelCheckpoint.load(run_dir / "model.pt").state_dict
    assert all(torch.isfinite(t.float()).all() for t in state.values())
    # the best round's model is kept beside the final one, in the same format
    assert history["best_round"] in (1, 2)
    best = ModelCheckpoint.load(run_dir / "best-model.pt")
    assert f"round {history['best_round']}" in best.description
    assert "final mean Dice" in result.stdout
    # the ServerApp's trackers wrote beside the run folders: TensorBoard events and an MLflow run
    assert list((output / "tensorboard" / run_dir.name).glob("events.out.tfevents.*"))
    client = MlflowClient(tracking_uri(output))
    (tracked,) = client.search_runs([client.get_experiment_by_name("fedseg").experiment_id])
    assert tracked.info.run_name == run_dir.name and "site-1/eval/dice" in tracked.data.metrics
    # `fedseg predict` segments a scan of the sites' kind with the run's own model file, on the scan's grid
    site = write_site(tmp_path / "scans", 0, TINY_RUN["synthetic-subjects"], TINY_RUN["synthetic-size"], 0, 3)
    subject = json.loads((site / "dataset.json").read_text())["training"][0]
    image, truth = site / subject["image"], np.asarray(nib.load(str(site / subject["label"])).dataobj)
    out = tmp_path / "predicted.nii.gz"
    predicted = CliRunner().invoke(cli, ["predict", "--model", str(run_dir / "model.pt"), str(image), str(out)])
    assert predicted.exit_code == 0, predicted.output
    labels = np.asarray(nib.load(str(out)).dataobj)
    assert labels.shape == truth.shape and np.allclose(nib.load(str(out)).affine, nib.load(str(image)).affine)
    assert _foreground_dice(labels, truth) > 0.3, "the trained model finds the structures of a scan it trained on"


def _foreground_dice(labels: np.ndarray, truth: np.ndarray) -> float:
    overlap = np.logical_and(labels > 0, truth > 0).sum()
    return float(2 * overlap / max((labels > 0).sum() + (truth > 0).sum(), 1))


def test_bad_run_config_fails_before_training(tmp_path: Path, flwr_run) -> None:
    output = tmp_path / "runs"
    result = flwr_run({"num-server-rounds": 2, "model": "resnet", "output-dir": str(output)}, num_supernodes=2)
    log = result.stdout + result.stderr
    assert "'model' is 'resnet'; choose one of: unet, segresnet, dynunet, ahnet" in log
    assert not output.exists(), "no run folder may be written for a rejected config"
    assert "configure_train" not in log
