"""Start this app with `flwr run` (local simulation) and collect wall time, history.json and peak memory."""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import REPO, TreeMemorySampler, descendants
from fedseg.local_superlink import flwr_environment, flwr_run_command

SUPERLINK_MARK = "flower-superlink"
SIMULATION_MARK = "flwr-simulation"


@dataclass(frozen=True)
class SimulationRun:
    """What one `flwr run` took and wrote."""

    wall_seconds: float
    history: dict[str, Any]
    peak_rss_bytes: int
    log_tail: str

    @property
    def round_seconds(self) -> list[float]:
        """Seconds of every training round (train + aggregate + evaluate), as history.json records them."""
        return [r["seconds"] for r in self.history["rounds"] if r["round"] > 0]


def _local_superlinks() -> list[int]:
    return [
        int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and SUPERLINK_MARK in _cmdline(int(e.name))
    ]


class SimulationProcesses:
    """The process tree of the first simulation the local SuperLink starts after this object is made.

    Other runs may share the SuperLink; only the first new `flwr-simulation` process (and its Ray
    children) is followed, so their memory is not counted.
    """

    def __init__(self) -> None:
        self.before = {pid for link in _local_superlinks() for pid in descendants(link)}
        self.root: int | None = None

    def __call__(self) -> list[int]:
        if self.root is None:
            for link in _local_superlinks():
                for pid in descendants(link):
                    if pid not in self.before and SIMULATION_MARK in _cmdline(pid):
                        self.root = pid
                        break
        return descendants(self.root) if self.root is not None else []


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def flwr_run(run_config: dict[str, Any], num_supernodes: int, num_cpus: int, timeout: float = 1800) -> SimulationRun:
    """`flwr run` this app (no runtime dependency installation) into a fresh temporary output dir."""
    env = flwr_environment(FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    with tempfile.TemporaryDirectory(prefix="fedseg-bench-") as tmp:
        output = Path(tmp) / "runs"
        federation = f"num-supernodes={num_supernodes} client-resources-num-cpus={num_cpus}"
        command = flwr_run_command(REPO, None, {**run_config, "output-dir": str(output)}, [], [federation])
        with TreeMemorySampler(SimulationProcesses()) as sampler:
            started = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
            wall = time.perf_counter() - started
        log = done.stdout + done.stderr
        histories = sorted(output.glob("*/history.json"))
        if done.returncode != 0 or len(histories) != 1:
            raise RuntimeError(f"flwr run failed (exit {done.returncode}, histories {histories}):\n{log[-4000:]}")
        history = json.loads(histories[0].read_text())
    return SimulationRun(wall, history, sampler.peak, log[-2000:])
