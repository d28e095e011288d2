"""Flower ServerApp: run config → strategy → rounds → run folder (history.json, model.pt)."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedseg.bundle import differences, read_bundle
from fedseg.checkpoint import resume_checkpoint
from fedseg.config import RunConfig
from fedseg.data.sites import with_input_channels
from fedseg.federation import Federation
from fedseg.history import History
from fedseg.initial_model import initial_model
from fedseg.local_superlink import environment_line, relative_path_notes
from fedseg.model_spec import checked_network, intensity_window
from fedseg.privacy import privacy_summary
from fedseg.tracking import open_run_tracker
from strategies.registry import build_strategy

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, build the strategy and the initial model, run all rounds."""
    config = with_input_channels(RunConfig.from_mapping(context.run_config))
    strategy = build_strategy(config)
    network, parameters = checked_network(config)  # built and run on a dummy batch: fails before round 1
    checkpoint = resume_checkpoint(config)
    run_dir = Path(config.resume_from).expanduser().resolve() if checkpoint else new_run_dir(config)
    log(
        INFO,
        "[fedseg] strategy %s, model %s [%s] (%d input channel(s), %s parameters), %d rounds; run folder %s",
        config.strategy,
        network,
        network.source,
        config.in_channels,
        f"{parameters:,}",
        config.num_server_rounds,
        run_dir,
    )
    log(INFO, "[fedseg] %s", environment_line())
    for line in relative_path_notes(dict(context.run_config), Path.cwd()):
        log(WARNING, "[fedseg] %s", line)
    for line in bundle_differences(config):
        log(WARNING, "[fedseg] bundle: %s", line)
    tracker = open_run_tracker(config, run_dir)
    _, history = Federation(grid, strategy, config, run_dir, tracker).run(
        initial_weights(config) if checkpoint is None else ArrayRecord(), resume=checkpoint
    )  # init-from: new runs only
    log(
        INFO,
        "[fedseg] final mean Dice %.3f (initial %.3f); outputs in %s",
        history.final_dice,
        history.rounds[0].mean_dice,
        run_dir,
    )
    if config.label_scheme != "classes":
        log(INFO, "[fedseg] final mean Dice per region: %s", structure_summary(history, config))
    for line in privacy_summary(history.to_dict()):
        log(INFO, "[fedseg] %s", line)


def structure_summary(history: History, config: RunConfig) -> str:
    """Mean over sites of the last round's Dice of every scored structure, e.g. "WT 0.81  TC 0.66  ET 0.52"."""
    sites = history.rounds[-1].eval.values()
    parts = []
    for name, key in zip(config.labels.structures, config.labels.metric_names, strict=True):
        values = [site[key] for site in sites if key in site]
        parts.append(f"{name} {sum(values) / len(values):.3f}" if values else f"{name} n/a")
    return "  ".join(parts)


def initial_weights(config: RunConfig) -> ArrayRecord:
    """The initial global model: seeded random weights (the same on every run with the same seed), or
    run-config `init-from`'s (fedseg.initial_model)."""
    initial = initial_model(config)
    log(INFO, "[fedseg] initial model: %s", initial)
    return ArrayRecord(initial.state_dict)


def bundle_differences(config: RunConfig) -> list[str]:
    """Where a bundle's pre/post-processing differs from the run's (fedseg.bundle), else []."""
    if config.model != "bundle":
        return []
    return differences(read_bundle(config.bundle), config.spacing, config.patch_size, intensity_window(config))


def new_run_dir(config: RunConfig) -> Path:
    """A fresh folder `<output-dir>/<time>-<strategy>` (relative output-dir: from the current folder)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path(config.output_dir).expanduser().resolve()
    run_dir = base / f"{stamp}-{config.strategy}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = base / f"{stamp}-{config.strategy}-{suffix}"
    run_dir.mkdir(parents=True)
    return run_dir
