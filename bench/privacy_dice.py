"""Dice versus sample-level ε: the same small federation without DP and with DP-SGD at several noise levels.

    python -m bench.privacy_dice [--rounds 4] [--noise 2.0 1.0 0.6]

Each setting is one `flwr run` (2 synthetic sites, FedAvg); the table gives the final mean test
Dice and the largest ε any site reported (δ = 1e-5). Not a test: a measurement for the README.
"""

from __future__ import annotations

import argparse

from bench.common import print_table
from bench.flower_run import flwr_run
from fedseg.privacy import site_epsilons

SMALL_SITES = {
    "synthetic-subjects": 8,
    "synthetic-size": 24,
    "patch-size": "16,16,16",
    "batch-size": 2,
    "local-epochs": 2,
    "learning-rate": 0.01,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--noise", type=float, nargs="+", default=[2.0, 1.0, 0.6])
    args = parser.parse_args()
    rows = []
    for sigma in [0.0, *args.noise]:
        dp = {"dp-sgd": True, "dp-noise-multiplier": sigma} if sigma > 0 else {}
        run = flwr_run({**SMALL_SITES, "num-server-rounds": args.rounds, **dp}, num_supernodes=2, num_cpus=1)
        epsilons = [eps for eps, _ in site_epsilons(run.history).values()]
        rows.append(
            [
                "no DP" if sigma == 0 else sigma,
                max(epsilons) if epsilons else "∞",
                run.history["rounds"][-1]["mean_dice"],
                run.history["rounds"][0]["mean_dice"],
                run.wall_seconds,
            ]
        )
    print_table(
        "Dice vs sample-level ε (2 sites, FedAvg)", ["noise σ", "ε (δ=1e-5)", "final Dice", "initial Dice", "s"], rows
    )


if __name__ == "__main__":
    main()
