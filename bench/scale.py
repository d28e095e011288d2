"""Benchmark 4: simulation scale — 10, 50 and 100 sites of a tiny model with `flwr run` on this machine.

Each site is a tiny synthetic institution (few small subjects, 16³ patches, one local epoch);
every client asks for one CPU. Reported per site count: wall time, seconds per round, the summed
peak RSS of the simulation's processes (sampled), and growth per added site (least squares).
"""

from __future__ import annotations

import time

from bench.common import BenchOptions, print_table, write_result
from bench.flower_run import flwr_run

TINY = {
    "synthetic-size": 16,
    "synthetic-subjects": 3,
    "patch-size": "16,16,16",
    "batch-size": 2,
    "local-epochs": 1,
    "min-sites": 2,
}


def settings(options: BenchOptions) -> tuple[list[int], int, float]:
    """(site counts, rounds, time budget in seconds: larger counts are skipped once it is spent)."""
    return ([10, 50, 100], 1, 900.0) if options.quick else ([10, 50, 100], 2, 3600.0)


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares growth of ys per unit of xs (NaN with fewer than two points)."""
    if len(xs) < 2:
        return float("nan")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def run(options: BenchOptions) -> dict:
    counts, rounds, budget = settings(options)
    started = time.perf_counter()
    results, skipped = [], []
    for sites in counts:
        spent = time.perf_counter() - started
        if results and spent + results[-1]["wall_seconds"] * sites / results[-1]["sites"] > budget:
            skipped.append({"sites": sites, "reason": f"projected beyond the {budget:.0f} s budget"})
            continue
        sim = flwr_run({**TINY, "num-server-rounds": rounds}, num_supernodes=sites, num_cpus=1)
        results.append(
            {
                "sites": sites,
                "rounds": rounds,
                "wall_seconds": sim.wall_seconds,
                "round_seconds": sim.round_seconds,
                "peak_rss_mb": sim.peak_rss_bytes / 2**20,
                "sites_evaluated": len(sim.history["rounds"][-1]["eval"]),
            }
        )
    xs = [r["sites"] for r in results]
    growth = {
        "wall_seconds_per_site": slope(xs, [r["wall_seconds"] for r in results]),
        "round_seconds_per_site": slope(xs, [sum(r["round_seconds"]) / r["rounds"] for r in results]),
        "peak_rss_mb_per_site": slope(xs, [r["peak_rss_mb"] for r in results]),
    }
    print_table(
        "4. simulation scale (tiny model, 1 CPU per client, this machine)",
        ["sites", "rounds", "wall s", "s per round", "peak RSS MB", "sites evaluated"],
        [
            [
                r["sites"],
                r["rounds"],
                r["wall_seconds"],
                sum(r["round_seconds"]) / r["rounds"],
                r["peak_rss_mb"],
                r["sites_evaluated"],
            ]
            for r in results
        ],
    )
    print("growth per site: " + ", ".join(f"{k} {v:.3g}" for k, v in growth.items()))
    for s in skipped:
        print(f"skipped {s['sites']} sites: {s['reason']}")
    payload = {"tiny_run_config": TINY, "cases": results, "growth": growth, "skipped": skipped}
    write_result("scale", options, payload)
    return payload
