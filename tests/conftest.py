"""Shared fixtures: tiny seeded synthetic sites and a `flwr run` launcher on a private local SuperLink."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from private_superlink import free_port, start_local_superlink

from fedseg.local_superlink import (
    find_local_superlink,
    flwr_environment,
    flwr_run_command,
    stop_local_superlink,
    this_bin_dir,
)

pytest_plugins = ("private_superlink",)  # the private_flwr fixture

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
    """Synthetic sites of in-process tests go to a per-session temporary cache (the apps that the session's
    local SuperLink starts have a cache of their own)."""
    monkeypatch.setenv("FEDSEG_CACHE", str(tmp_path_factory.getbasetemp() / "fedseg-cache"))


@pytest.fixture(scope="session")
def local_superlink() -> Iterator[Path]:
    """The session's local SuperLink, started from a folder of its own (yielded): a private FLWR_HOME and
    ports, set in this process too, so that every `flwr run` and `fedseg run` of the session uses this one
    SuperLink and never the machine's shared one (nor one that another checkout left behind)."""
    root = Path(tempfile.mkdtemp(prefix="fedseg-tests-flwr-"))  # not tmp_path: it outlives single tests
    env = {
        "FLWR_HOME": str(root / "flwr-home"),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FEDSEG_CACHE": str(root / "cache"),  # its apps' own cache, apart from the in-process tests' one
    }
    folder = root / "superlink-folder"
    folder.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        proc = start_local_superlink(this_bin_dir(), folder, dict(os.environ))
        try:
            yield folder
        finally:
            superlink = find_local_superlink()
            if superlink is not None:
                stop_local_superlink(superlink)
            proc.wait(timeout=30)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def flwr_run(local_superlink: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`flwr_run(run_config, num_supernodes)`: this app as a simulation (`flwr run`, no runtime dependency
    installation) on the session's local SuperLink; one CPU per simulated site."""

    def run(
        run_config: dict[str, object], num_supernodes: int, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus=1"
        command = flwr_run_command(REPO, None, run_config, [], [federation])
        return subprocess.run(
            command, env=flwr_environment(), capture_output=True, text=True, timeout=timeout, cwd=REPO
        )

    return run


def read_history(output_dir: Path, run: subprocess.CompletedProcess[str] | None = None) -> dict:
    """history.json of the single run written under `output_dir`; `run` (the `flwr run` that should have
    written it) adds the end of its output to the failure message."""
    runs = sorted(output_dir.glob("*/history.json"))
    log = f"\n{run.stdout[-3000:]}{run.stderr[-3000:]}" if run is not None else ""
    assert len(runs) == 1, f"expected one run folder in {output_dir}, found {runs}{log}"
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
