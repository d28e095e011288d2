"""Shared fixtures: tiny seeded synthetic sites and a `flwr run` launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tiny but learnable settings shared by the end-to-end tests (seconds per round on 2 cores).
TINY_RUN = {
    "synthetic-size": 24,
    "synthetic-subjects": 5,
    "patch-size": "16,16,16",
    "batch-size": 2,
    "local-epochs": 2,
    "learning-rate": 0.01,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Synthetic sites of in-process tests go to a per-session temporary cache.

    Apps started by `flwr run` inherit the environment of the long-lived local SuperLink instead,
    so their sites and caches go to that process's $FEDSEG_CACHE (default ~/.cache/fedseg).
    """
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path_factory.getbasetemp() / "fedseg-cache"))


def toml_value(value: object) -> str:
    """A run-config override value as Flower's --run-config parser expects it."""
    return (
        json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    )


def flwr_run(
    run_config: dict[str, object], num_supernodes: int, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run this app as a local simulation with `flwr run`, no runtime dependency installation."""
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    overrides = " ".join(f"{key}={toml_value(value)}" for key, value in run_config.items())
    command = [
        os.path.join(bin_dir, "flwr"),
        "run",
        str(REPO),
        "--stream",
        "--run-config",
        overrides,
        "--federation-config",
        f"num-supernodes={num_supernodes} client-resources-num-cpus=1",
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def read_history(output_dir: Path) -> dict:
    """history.json of the single run written under `output_dir`."""
    runs = sorted(output_dir.glob("*/history.json"))
    assert len(runs) == 1, f"expected one run folder in {output_dir}, found {runs}"
    return json.loads(runs[0].read_text())


@contextmanager
def installed_example(distribution: str) -> Iterator[None]:
    """pip-install examples/<distribution> (editable, no dependencies) for the block; uninstall it after if
    it was not installed before."""
    folder = REPO / "examples" / distribution

    def pip(*args: str) -> None:
        subprocess.run([sys.executable, "-m", "pip", "-q", *args], check=True, capture_output=True, text=True)

    try:
        version(distribution)
        already = True
    except PackageNotFoundError:
        already = False
        pip("install", "--no-deps", "--no-build-isolation", "-e", str(folder))
    sys.path.insert(0, str(folder))  # the editable install's path hook is only read at interpreter start
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        if not already:
            pip("uninstall", "-y", distribution)
