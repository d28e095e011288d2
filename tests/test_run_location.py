"""Runs land where the user expects: `fedseg run` from a second folder writes below that folder although
the local SuperLink was started from the first one, and a local SuperLink of another Python environment
is found, refused and stopped. Every SuperLink here is private (own FLWR_HOME and ports)."""

from __future__ import annotations

import os
import site
import socket
import subprocess
import time
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import REPO, TINY_RUN, read_history, toml_value

from fedseg.local_superlink import (
    SuperLinkError,
    absolute_run_config,
    check_local_superlink,
    find_local_superlink,
    stop_local_superlink,
    this_bin_dir,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def private_flwr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """A private FLWR_HOME and local SuperLink ports (also set in this process); any SuperLink on them
    is stopped at the end."""
    env = {"FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    yield {**os.environ, **env}
    superlink = find_local_superlink()
    if superlink is not None:
        stop_local_superlink(superlink)


def start_local_superlink(bin_dir: Path, folder: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a local SuperLink as `flwr` does (flwr.cli.local_superlink), from `folder`, with the
    flower-superlink of `bin_dir`; wait until it answers."""
    home = Path(env["FLWR_HOME"]) / "local-superlink"
    home.mkdir(parents=True, exist_ok=True)
    http = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    command = [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
               "--control-api-address", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}", "--host", "127.0.0.1",
               "--port", http, "--database", str(home / "state.db")]
    proc = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"flower-superlink exited with {proc.returncode}"
        try:
            if httpx.get(f"http://127.0.0.1:{http}/health", timeout=2).is_success:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    raise AssertionError("the local SuperLink did not start within 120 s")


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
    assert resolved == {"output-dir": str(tmp_path / "runs"), "data-dir": str(tmp_path / "sites"),
                        "tracking-dir": str(tmp_path / "tb")}
    # absolute paths and the non-path values ("synthetic", "") stay as they are
    assert absolute_run_config(REPO, [f'output-dir="{tmp_path}/x"'], Path("/elsewhere")) == {
        "output-dir": str(tmp_path / "x")}


def test_a_superlink_of_another_environment_is_refused_then_stopped(tmp_path: Path,
                                                                     private_flwr: dict[str, str]) -> None:
    first = tmp_path / "first-checkout"
    first.mkdir()
    other_bin = other_environment(tmp_path / "other-venv")
    proc = start_local_superlink(other_bin, first, private_flwr)
    found = find_local_superlink()
    assert found is not None and found.pid == proc.pid
    assert found.bin_dir == other_bin.resolve() and found.folder == first and not found.same_environment
    with pytest.raises(SuperLinkError, match=rf"local SuperLink pid {proc.pid}: another Python environment "
                                             rf"\({other_bin.resolve()}\), started from folder {first}: .*"
                                             r"fedseg superlink stop\) or pass --restart-superlink"):
        check_local_superlink(restart=False)
    assert proc.poll() is None
    check_local_superlink(restart=True, echo=lambda line: None)
    assert proc.wait(timeout=30) is not None and find_local_superlink() is None


def test_fedseg_run_writes_below_the_callers_folder_not_the_superlinks(tmp_path: Path,
                                                                       private_flwr: dict[str, str]) -> None:
    first, second = tmp_path / "first-checkout", tmp_path / "second-checkout"
    first.mkdir()
    second.mkdir()
    start_local_superlink(this_bin_dir(), first, private_flwr)
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in {**TINY_RUN, "num-server-rounds": 1,
                                                              "local-epochs": 1}.items())
    result = subprocess.run(
        [str(this_bin_dir() / "fedseg"), "run", str(REPO), "--run-config", overrides,
         "--federation-config", "num-supernodes=2 client-resources-num-cpus=1"],
        cwd=second, env=private_flwr, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"output-dir: {second / 'runs'}" in result.stdout
    runs = list((second / "runs").glob("*/history.json"))  # the default output-dir "runs", below the caller's folder
    assert len(runs) == 1, result.stdout[-3000:] + result.stderr[-2000:]
    history = read_history(second / "runs")
    assert [r["round"] for r in history["rounds"]] == [0, 1]
    assert not (first / "runs").exists()
    assert f"folder {first}" in result.stdout  # the ServerApp ran in the SuperLink's folder and says so
