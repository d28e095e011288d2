"""Entry point: `python -m bench {all|throughput|round|aggregation|scale|data|secagg|startup} [--quick]
[--device cuda]`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch

from bench.common import BenchOptions

BENCHMARKS = {
    "throughput": "bench.throughput",  # 1. client training vs bare MONAI loop
    "round": "bench.round_overhead",  # 2. simulated round vs the same epochs run bare
    "aggregation": "bench.aggregation",  # 3. fedseg strategies vs Flower FedAvg vs bare mean
    "scale": "bench.scale",  # 4. 10 / 50 / 100 simulated sites
    "data": "bench.data_cache",  # 5. first vs cached data epoch
    "startup": "bench.site_startup",  # 7. a site's fixed start-up cost per message, deployment vs simulation
    "secagg": "bench.secagg",  # 6. secure-aggregation round vs plain FedAvg, 1.2 M / 20 M params, 3 / 10 sites
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("names", nargs="+", choices=["all", *BENCHMARKS], help="benchmarks to run")
    parser.add_argument("--quick", action="store_true", help="small settings: the whole suite in a few minutes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device of training benchmarks")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    options = BenchOptions(quick=args.quick, device=args.device)
    names = list(BENCHMARKS) if "all" in args.names else list(dict.fromkeys(args.names))
    for name in names:
        started = time.perf_counter()
        importlib.import_module(BENCHMARKS[name]).run(options)
        print(f"({name}: {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
