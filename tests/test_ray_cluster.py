"""A simulation on an existing Ray cluster: a loopback two-node cluster (`ray start --head`, then a second
node joining it with `ray start --address`), a SuperLink started with RAY_ADDRESS naming the head, and
`flwr run` of this app: the simulation's ray.init() attaches to the cluster and the sites run as actors
on both nodes (one CPU each, one CPU per site). The cluster lives in a private Ray temp folder, so no
other Ray user on the machine sees it, and its processes are ended by pid at the end."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN, read_history
from private_superlink import free_port, start_local_superlink, stop_processes

from fedseg.local_superlink import flwr_run_command, this_bin_dir


def _pids_using(marker: str) -> list[int]:
    """Processes whose command line names `marker` (the cluster's private temp folder)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.fixture
def ray_cluster(private_flwr: dict[str, str]) -> Iterator[tuple[dict[str, str], Path]]:
    """(environment whose RAY_ADDRESS names the head, the cluster's log folder): a head and a second node,
    one CPU each."""
    temp = tempfile.mkdtemp(prefix="fs-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    env = {**private_flwr, "RAY_TMPDIR": temp, "RAY_USAGE_STATS_ENABLED": "0"}
    address = f"127.0.0.1:{free_port()}"
    ray = str(this_bin_dir() / "ray")
    try:
        for args in (
            ["--head", f"--port={address.split(':')[1]}", "--include-dashboard=false"],
            [f"--address={address}"],
        ):
            subprocess.run(
                [ray, "start", *args, "--num-cpus=1", "--num-gpus=0"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
        yield {**env, "RAY_ADDRESS": address}, Path(temp) / "ray" / "session_latest" / "logs"
    finally:
        stop_processes(_pids_using(temp))  # never `ray stop`: it ends every Ray process of the user
        shutil.rmtree(temp, ignore_errors=True)


def test_simulation_runs_on_an_existing_two_node_ray_cluster(
    tmp_path: Path, ray_cluster: tuple[dict[str, str], Path]
) -> None:
    env, cluster_logs = ray_cluster
    start_local_superlink(this_bin_dir(), tmp_path, env)  # the SuperLink's simulations inherit RAY_ADDRESS
    output = tmp_path / "runs"
    run_config = {**TINY_RUN, "num-server-rounds": 1, "local-epochs": 1, "output-dir": str(output)}
    result = subprocess.run(
        flwr_run_command(REPO, None, run_config, [], ["num-supernodes=2 client-resources-num-cpus=1"]),
        env={**env, "PATH": f"{this_bin_dir()}{os.pathsep}{env['PATH']}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log = (Path(env["FLWR_HOME"]) / "local-superlink" / "superlink.log").read_text(errors="replace")
    assert result.returncode == 0 and list(output.glob("*/history.json")), result.stdout[-3000:] + log[-3000:]
    history = read_history(output)
    assert set(history["rounds"][-1]["eval"]) == {"site-0", "site-1"}
    # The simulation was the cluster's first job (01000000), and both nodes (raylet.out: the head, raylet.1.out:
    # the second node) started worker processes of that job: the sites' ClientApp actors.
    assert "Registering job. job_id=01000000" in (cluster_logs / "gcs_server.out").read_text(errors="replace")
    job_workers = {
        name.rsplit("-", 1)[1].split(".")[0]
        for name in os.listdir(cluster_logs)
        if name.startswith("worker-") and "-01000000-" in name
    }
    for raylet in ("raylet.out", "raylet.1.out"):
        started = (cluster_logs / raylet).read_text(errors="replace")
        assert any(f"Started worker process with pid {pid} " in started for pid in job_workers), raylet
