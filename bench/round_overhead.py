"""Benchmark 2: a simulated federated round (N sites, E local epochs) vs the same epochs run bare.

The federated side is a real `flwr run` of this app (one client at a time: each client asks for all
CPUs, so sites train one after another as in the bare side). Per round, history.json gives the
round's seconds (send, train, validation Dice, aggregate, test evaluation). The bare side builds
the same sites' data and trainers in this process and runs `fit(E epochs)` site after site.
The two sides alternate (bare, flwr, bare, flwr). Ratio = median round seconds / median bare
seconds; target <= 1.10. Start-up (Flower SuperLink/Ray, app loading, round-0 evaluation) is
what the wall time holds beyond the rounds, and is reported apart.
"""

from __future__ import annotations

import os
import time

import torch

from bench.common import BenchOptions, median, print_table, write_result
from bench.flower_run import flwr_run
from fedseg.config import RunConfig
from fedseg.data.datasets import evaluation_dataset, training_dataset
from fedseg.data.sites import load_site_split, site_dir_for
from fedseg.trainer import SegmentationTrainer

TARGET = 1.10


def settings(options: BenchOptions) -> tuple[dict, int, int]:
    """(run config, sites, repeats)."""
    if options.quick:
        run = {
            "num-server-rounds": 2,
            "local-epochs": 2,
            "synthetic-size": 32,
            "synthetic-subjects": 6,
            "patch-size": "24,24,24",
            "batch-size": 2,
        }
        return run, 2, 2
    run = {
        "num-server-rounds": 3,
        "local-epochs": 3,
        "synthetic-size": 40,
        "synthetic-subjects": 8,
        "patch-size": "32,32,32",
        "batch-size": 2,
    }
    return run, 3, 3


def bare_round(config: RunConfig, sites: int) -> dict[str, float]:
    """Seconds of E local epochs on every site, one site after another, plus their evaluations apart."""
    fit_seconds = eval_seconds = 0.0
    for site in range(sites):
        split = load_site_split(site_dir_for(config, site), seed=config.seed)
        torch.manual_seed(config.seed)
        trainer = SegmentationTrainer(
            config.model,
            config.num_classes,
            config.patch_size,
            batch_size=config.batch_size,
            learning_rate=config.learning_rate,
        )
        train_set = training_dataset(split.train, config.patch_size)
        started = time.perf_counter()
        trainer.fit(train_set, epochs=config.local_epochs, seed=site)
        fit_seconds += time.perf_counter() - started
        started = time.perf_counter()
        trainer.evaluate(evaluation_dataset(split.val))
        trainer.evaluate(evaluation_dataset(split.test))
        eval_seconds += time.perf_counter() - started
    return {"fit": fit_seconds, "eval": eval_seconds}


def run(options: BenchOptions) -> dict:
    run_config, sites, repeats = settings(options)
    config = RunConfig.from_mapping(run_config)
    cpus = os.cpu_count() or 1
    bare_round(config, sites)  # warm-up: writes the synthetic sites, imports, allocator
    bare, federated = [], []
    for _ in range(repeats):
        bare.append(bare_round(config, sites))
        federated.append(flwr_run(run_config, num_supernodes=sites, num_cpus=cpus))
    round_seconds = [s for f in federated for s in f.round_seconds]
    client_train = [
        sum(site["train-seconds"] for site in r["train"].values())
        for f in federated
        for r in f.history["rounds"]
        if r["round"] > 0
    ]
    bare_fit = median([b["fit"] for b in bare])
    bare_fit_eval = median([b["fit"] + b["eval"] for b in bare])
    outside = [f.wall_seconds - sum(f.round_seconds) for f in federated]
    result = {
        "run_config": run_config,
        "sites": sites,
        "repeats": repeats,
        "bare_fit_seconds": bare_fit,
        "bare_fit_plus_eval_seconds": bare_fit_eval,
        "round_seconds_median": median(round_seconds),
        "client_fit_seconds_median": median(client_train),
        "ratio": median(round_seconds) / bare_fit,
        "ratio_vs_bare_fit_plus_eval": median(round_seconds) / bare_fit_eval,
        "wall_seconds": [f.wall_seconds for f in federated],
        "startup_and_round0_seconds": outside,
        "all_round_seconds": round_seconds,
        "bare": bare,
    }
    print_table(
        f"2. simulated round vs the same epochs bare "
        f"({sites} sites x {run_config['local-epochs']} epochs; target <= {TARGET})",
        [
            "bare fit s",
            "bare fit+eval s",
            "round s (median)",
            "client fit s",
            "ratio round/bare fit",
            "ratio round/bare fit+eval",
            "flwr run wall s",
            "outside rounds s (start-up, round 0)",
        ],
        [
            [
                bare_fit,
                bare_fit_eval,
                result["round_seconds_median"],
                result["client_fit_seconds_median"],
                result["ratio"],
                result["ratio_vs_bare_fit_plus_eval"],
                median(result["wall_seconds"]),
                median(outside),
            ]
        ],
    )
    write_result("round", options, result)
    return result
