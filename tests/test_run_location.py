"""Runs land where the user expects: `fedseg run` from a second folder writes below that folder although
the local SuperLink was started from the first one, and a local SuperLink of another Python environment
is found, refused and stopped. Every SuperLink here is private (own FLWR_HOME and ports)."""

from __future__ import annotations

import site
import subprocess
import venv
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, read_history, toml_value
from mlflow.tracking import MlflowClient
from private_superlink import start_local_superlink

from fedseg.local_superlink import (
    SuperLinkError,
    absolute_run_config,
    check_local_superlink,
    find_local_superlink,
    this_bin_dir,
)
from fedseg.tracking.mlflow_tracker import tracking_uri

pytest_plugins = ("private_superlink",)  # the private_flwr fixture


def other_environment(root: Path) -> Path:
    """A second Python environment (its own prefix and bin folder) that sees this one's packages; its
    flower-superlink runs with its own interpreter. Returns its bin folder."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    bin_dir = root / "bin"
    (site_packages,) = (root / "lib").glob("python*/site-packages")
    (site_packages / "shared.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    script = (this_bin_dir() / "flower-superlink").read_text().split("\n", 1)[1]
    (bin_dir / "flower-superlink").write_text(f"#!{bin_dir / 'python'}\n{script}")
    (bin_dir / "flower-superlink").chmod(0o755)
    return bin_dir


def test_relative_paths_resolve_against_the_callers_folder(tmp_path: Path) -> None:
    resolved = absolute_run_config(REPO, ['data-dir="sites" num-server-rounds=2', 'tracking-dir="tb"'], tmp_path)
    assert resolved == {
        "output-dir": str(tmp_path / "runs"),
        "data-dir": str(tmp_path / "sites"),
        "tracking-dir": str(tmp_path / "tb"),
    }
    # absolute paths and the non-path values ("synthetic", "") stay as they are
    assert absolute_run_config(REPO, [f'output-dir="{tmp_path}/x"'], Path("/elsewhere")) == {
        "output-dir": str(tmp_path / "x")
    }


def test_a_superlink_of_another_environment_is_refused_then_stopped(
    tmp_path: Path, private_flwr: dict[str, str]
) -> None:
    first = tmp_path / "first-checkout"
    first.mkdir()
    other_bin = other_environment(tmp_path / "other-venv")
    proc = start_local_superlink(other_bin, first, private_flwr)
    found = find_local_superlink()
    assert found is not None and found.pid == proc.pid
    assert found.bin_dir == other_bin.resolve() and found.folder == first and not found.same_environment
    with pytest.raises(
        SuperLinkError,
        match=rf"local SuperLink pid {proc.pid}: another Python environment "
        rf"\({other_bin.resolve()}\), started from folder {first}: .*"
        r"fedseg superlink stop\) or pass --restart-superlink",
    ):
        check_local_superlink(restart=False)
    assert proc.poll() is None
    check_local_superlink(restart=True, echo=lambda line: None)
    assert proc.wait(timeout=30) is not None and find_local_superlink() is None


def test_fedseg_run_writes_below_the_callers_folder_not_the_superlinks(
    tmp_path: Path, private_flwr: dict[str, str]
) -> None:
    first, second = tmp_path / "first-checkout", tmp_path / "second-checkout"
    first.mkdir()
    second.mkdir()
    start_local_superlink(this_bin_dir(), first, private_flwr)
    overrides = " ".join(
        f"{k}={toml_value(v)}"
        for k, v in {**TINY_RUN, "num-server-rounds": 1, "local-epochs": 1, "tracking": "tensorboard,mlflow"}.items()
    )
    result = subprocess.run(
        [
            str(this_bin_dir() / "fedseg"),
            "run",
            str(REPO),
            "--run-config",
            overrides,
            "--federation-config",
            "num-supernodes=2 client-resources-num-cpus=1",
        ],
        cwd=second,
        env=private_flwr,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"output-dir: {second / 'runs'}" in result.stdout
    runs = list((second / "runs").glob("*/history.json"))  # the default output-dir "runs", below the caller's folder
    assert len(runs) == 1, result.stdout[-3000:] + result.stderr[-2000:]
    history = read_history(second / "runs")
    assert [r["round"] for r in history["rounds"]] == [0, 1]
    assert not (first / "runs").exists()
    assert f"folder {first}" in result.stdout  # the ServerApp ran in the SuperLink's folder and says so
    # the ServerApp's trackers wrote beside the run folders: TensorBoard events and an MLflow run
    run_name = next((second / "runs").glob("*/history.json")).parent.name
    assert list((second / "runs" / "tensorboard" / run_name).glob("events.out.tfevents.*"))
    client = MlflowClient(tracking_uri(second / "runs"))
    (tracked,) = client.search_runs([client.get_experiment_by_name("fedseg").experiment_id])
    assert tracked.info.run_name == run_name and "site-1/eval/dice" in tracked.data.metrics
