"""Benchmark 7: the fixed start-up cost of one message at a site, deployment vs simulation.

Flower 1.41 answers every message in deployment with a fresh `flwr-clientapp` process; simulation
keeps its client processes. Stages of that fixed cost (the message's own work, training or
evaluation, is not counted), each measured in fresh processes on one synthetic site whose
preprocessing cache and validation memo are already filled (every message after a site's first):

- before (no worker, `fedseg site join --no-warm-worker`): the process with Flower's ClientApp
  runtime imported; importing fedseg's ClientApp (torch, MONAI); the site runtime, split into data
  validation (memo), split file, model build, datasets opened (disk cache) and the rest;
- after (the site's warm worker, the default): the process with Flower's runtime and the light
  entry (clients/entry.py) imported; the hand-over of one message carrying the model's weights to
  the worker and its reply (serialisation, socket, data-change check, cached runtime);
- simulation: the same runtime asked for again in a live process (the cached runtime).

The worker's own start (imports) and a run's first message (runtime build) are reported apart:
they are paid once per site and once per run config, not per message.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import REPO, BenchOptions, median, print_table, write_result

TARGET_S = 3.0
FLOWER_RUNTIME = "import flwr.supernode.cli.flwr_clientapp"  # what every flwr-clientapp process imports first


def settings(options: BenchOptions) -> tuple[dict, int, int, int]:
    """(run config, volume size, subjects, repeats)."""
    if options.quick:
        return {"patch-size": "24,24,24", "num-classes": 3, "in-channels": 1, "data-dir": "per-site"}, 32, 6, 3
    return {"patch-size": "32,32,32", "num-classes": 3, "in-channels": 1, "data-dir": "per-site"}, 48, 10, 5


# ---------------------------------------------------------------------- child processes
class Stages:
    """Wall and CPU seconds (this process) per named stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def add(self, stage: str, wall: float, cpu: float) -> None:
        self.wall[stage] = self.wall.get(stage, 0.0) + wall
        self.cpu[stage] = self.cpu.get(stage, 0.0) + cpu

    def timed(self, stage: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - wall, time.process_time() - cpu)

        return timed

    def to_json(self) -> str:
        return json.dumps({"wall": self.wall, "cpu": self.cpu})


def _context(site: str, run_config: dict):
    from flwr.app import Context, RecordDict

    return Context(
        run_id=1, node_id=1, node_config={"data-dir": site, "site-id": 0}, state=RecordDict(), run_config=run_config
    )


def _import_client_app() -> None:
    import clients.client_app  # noqa: F401 - the import is what is timed


def child_fresh(site: str, run_config: dict) -> Stages:
    """One message's start-up in a fresh process without a worker: import the ClientApp, build the runtime."""
    stages = Stages()
    stages.timed("import fedseg ClientApp", _import_client_app)()
    import clients.site_runtime as runtime

    for attr, stage in [
        ("check_site", "validation (memo)"),
        ("load_site_split", "split file"),
        ("SegmentationTrainer", "model build"),
        ("training_dataset", "datasets opened"),
        ("evaluation_dataset", "datasets opened"),
    ]:
        setattr(runtime, attr, stages.timed(stage, getattr(runtime, attr)))
    context = _context(site, run_config)
    build = Stages()
    build.timed("runtime", runtime.runtime_for)(context)
    for clock, total in ((stages.wall, build.wall["runtime"]), (stages.cpu, build.cpu["runtime"])):
        clock["runtime rest"] = total - sum(v for k, v in clock.items() if k != "import fedseg ClientApp")
    stages.timed("simulation: runtime again", runtime.runtime_for)(context)
    return stages


def child_forward(site: str, run_config: dict, socket: str) -> Stages:
    """One message handed to the warm worker from a fresh process that imported only the light entry."""
    stages = Stages()
    app = stages.timed("import light entry", _import_entry)()
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for name in ("_run_id", "_node_id", "_task_id"):
        setattr(TaskIdentity, name, 1)
    weights = ArrayRecord({name: Array(value) for name, value in _zeros(socket).items()})
    message = Message(
        RecordDict({"config": ConfigRecord({"in-channels": 1}), "arrays": weights}), dst_node_id=1, message_type="query"
    )
    context = _context(site, run_config)
    context.node_config["worker"] = socket
    reply = stages.timed("hand-over and reply", app)(message, context)
    if reply.has_error():
        raise RuntimeError(f"the worker answered an error: {reply.error.reason}")
    if "clients.client_app" in sys.modules:
        raise RuntimeError("the message was answered in this process, not by the worker")
    return stages


def _import_entry():
    from clients.entry import app

    return app


def _zeros(socket: str) -> dict:
    import numpy as np

    shapes = json.loads(Path(socket).with_suffix(".shapes").read_text())
    return {name: np.zeros(shape, dtype=np.float32) for name, shape in shapes.items()}


# ---------------------------------------------------------------------- the benchmark
BEFORE = [
    "process + Flower runtime",
    "import fedseg ClientApp",
    "validation (memo)",
    "split file",
    "model build",
    "datasets opened",
    "runtime rest",
]
AFTER = ["process + Flower runtime", "import light entry", "hand-over and reply", "worker CPU for the message"]


def _python(env: dict[str, str], *args: str) -> tuple[float, float, str]:
    """Wall and CPU seconds of a fresh `python args...` (the whole process) and its stdout's last line."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *args],
        env=env,
        cwd=env["PYTHONPATH"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = proc.communicate()
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # cumulative: the caller takes differences
    if proc.returncode != 0:
        raise RuntimeError(f"{args}: exit {proc.returncode}\n{err[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, (out.strip().splitlines() or [""])[-1]


def _process(env: dict[str, str], *args: str) -> tuple[float, float, str]:
    """(wall, CPU, last line) of one child process alone."""
    cpu_before = sum(resource.getrusage(resource.RUSAGE_CHILDREN)[:2])
    wall, cpu_after, line = _python(env, *args)
    return wall, cpu_after - cpu_before, line


def run(options: BenchOptions) -> dict:
    from fedseg.data.synth import write_site

    run_config, size, subjects, repeats = settings(options)
    with tempfile.TemporaryDirectory(prefix="fedseg-startup-") as tmp:
        root = Path(tmp)
        app = _frozen_app(root / "app")
        env = {
            **os.environ,
            "FEDSEG_CACHE": str(root / "cache"),
            "PYTHONPATH": str(app),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        }
        site = str(write_site(root / "data", 0, subjects, size, 0))
        job = json.dumps([site, run_config])
        first_wall, _, first = _process(env, "-m", "bench.site_startup", "fresh", job)  # fills cache and memo
        before: list[dict] = []
        for _ in range(repeats):
            flower_wall, flower_cpu, _ = _process(env, "-c", FLOWER_RUNTIME)
            child = json.loads(_process(env, "-m", "bench.site_startup", "fresh", job)[2])
            before.append(
                {"wall": {BEFORE[0]: flower_wall, **child["wall"]}, "cpu": {BEFORE[0]: flower_cpu, **child["cpu"]}}
            )
        after, worker_start = _with_worker(env, root, site, run_config, repeats)
    result = {
        "run_config": run_config,
        "volume": size,
        "subjects": subjects,
        "repeats": repeats,
        "target_seconds": TARGET_S,
        "load_average": os.getloadavg(),
    }
    rows = []
    for clock in ("wall", "cpu"):
        b = {stage: median([m[clock].get(stage, 0.0) for m in before]) for stage in BEFORE}
        a = {stage: median([m[clock].get(stage, 0.0) for m in after["messages"]]) for stage in AFTER}
        sim = median([m[clock]["simulation: runtime again"] for m in before])
        result[clock] = {
            "before": b,
            "before_total": sum(b.values()),
            "after": a,
            "after_total": sum(a.values()),
            "simulation": sim,
        }
        rows += [[clock, f"before: {stage}", v] for stage, v in b.items()] + [[clock, "before: total", sum(b.values())]]
        rows += [[clock, f"after: {stage}", v] for stage, v in a.items()] + [[clock, "after: total", sum(a.values())]]
        rows.append([clock, "simulation: cached runtime", sim])
    result.update(
        {
            "first_message_ever_wall_seconds": first_wall,
            "first_message_ever": json.loads(first),
            "worker_start_wall_seconds": worker_start,
            "worker_first_message_wall_seconds": after["first"],
            "raw_before": before,
            "raw_after": after["messages"],
        }
    )
    rows += [
        ["wall", "once per site: worker start", worker_start],
        ["wall", "once per run: worker's first message", after["first"]],
    ]
    print_table(
        f"7. fixed start-up cost of one message at a site (median of {repeats}; target <= {TARGET_S} s; "
        f"load {result['load_average'][0]:.1f})",
        ["clock", "stage", "seconds"],
        rows,
    )
    write_result("startup", options, result)
    return result


def _frozen_app(folder: Path) -> Path:
    """This app's packages copied: the worker and the messages' code stay the same while the tree changes."""
    for part in ("fedseg", "clients", "strategies", "bench"):
        shutil.copytree(REPO / part, folder / part, ignore=shutil.ignore_patterns("__pycache__", "results"))
    return folder


def _with_worker(env: dict[str, str], root: Path, site: str, run_config: dict, repeats: int) -> tuple[dict, float]:
    """Messages handed to a warm worker: the first of the run (runtime build) apart, then `repeats` more."""
    socket = root / "worker.sock"
    _write_shapes(socket, run_config, env)
    started = time.perf_counter()
    worker = subprocess.Popen(
        [sys.executable, "-m", "fedseg.deploy.site_worker", "--socket", str(socket)],
        env=env,
        cwd=env["PYTHONPATH"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not socket.exists():
            if worker.poll() is not None:
                raise RuntimeError(f"the site worker exited with {worker.returncode}")
            time.sleep(0.05)
        worker_start = time.perf_counter() - started
        job = json.dumps([site, run_config, str(socket)])
        first = json.loads(_process(env, "-m", "bench.site_startup", "forward", job)[2])["wall"]["hand-over and reply"]
        messages = []
        for _ in range(repeats):
            wall, cpu, _ = _process(env, "-c", FLOWER_RUNTIME + "; import clients.entry")
            worker_cpu = _cpu_seconds(worker.pid)
            child = json.loads(_process(env, "-m", "bench.site_startup", "forward", job)[2])
            worker_cpu = _cpu_seconds(worker.pid) - worker_cpu
            messages.append(
                {
                    "wall": {AFTER[0]: wall - child["wall"][AFTER[1]], **child["wall"], AFTER[3]: 0.0},
                    "cpu": {AFTER[0]: cpu - child["cpu"][AFTER[1]], **child["cpu"], AFTER[3]: worker_cpu},
                }
            )
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    return {"first": first, "messages": messages}, worker_start


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _write_shapes(socket: Path, run_config: dict, env: dict[str, str]) -> None:
    """The model's weight shapes, so the handed-over message is as large as a real one."""
    code = (
        "import json, sys; from fedseg.config import RunConfig; from fedseg.trainer import SegmentationTrainer; "
        "c = RunConfig.from_mapping(json.loads(sys.argv[1])); "
        "t = SegmentationTrainer(c.model, c.num_classes, c.patch_size, in_channels=1); "
        "print(json.dumps({k: list(v.shape) for k, v in t.model.state_dict().items()}))"
    )
    socket.with_suffix(".shapes").write_text(_python(env, "-c", code, json.dumps(run_config))[2])


def main() -> None:
    mode, job = sys.argv[1], json.loads(sys.argv[2])
    print((child_fresh(*job) if mode == "fresh" else child_forward(*job)).to_json())


if __name__ == "__main__":
    main()
