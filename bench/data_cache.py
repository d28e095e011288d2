"""Benchmark 5: data pipeline — first epoch vs cached epochs of a site's training dataset.

One epoch = every training item through the pipeline and the DataLoader (batch 2), no training.
Sides: no cache (MONAI Dataset: load and preprocess every epoch), the in-memory cache
(CacheDataset: preprocessing once when built) and the disk cache the ClientApp uses
(PersistentDataset: written in the first epoch, read back later, also by a fresh dataset as in a
later round or run).
First = building the dataset + its first epoch. Target: cached epoch >= 5x faster than the first.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from monai.data import DataLoader, Dataset
from monai.transforms import Compose

from bench.common import BenchOptions, median, print_table, write_result
from fedseg.data.datasets import training_dataset
from fedseg.data.sites import load_site_split
from fedseg.data.synth import write_site
from fedseg.data.transforms import augmentation, training_preprocessing

TARGET = 5.0


def settings(options: BenchOptions) -> tuple[int, int, int, list[tuple[float, float, float] | None]]:
    """(volume side, subjects, repeats, resampling grids: None keeps the stored grid, else mm)."""
    if options.quick:
        return 64, 6, 3, [None, (1.0, 1.0, 1.0)]
    return 96, 10, 5, [None, (1.0, 1.0, 1.0)]


def epoch(dataset: Dataset) -> int:
    """Iterate one epoch as the trainer's loader does; returns the batches seen."""
    return sum(1 for _ in DataLoader(dataset, batch_size=2, shuffle=True, num_workers=0))


def timed(make: callable) -> tuple[float, Dataset]:
    started = time.perf_counter()
    dataset = make()
    epoch(dataset)
    return time.perf_counter() - started, dataset


def one_repeat(items: list, patch: Sequence[int], pixdim: tuple | None, workdir: Path, index: int) -> dict[str, float]:
    """Seconds of every side's epochs in one pass (sides run back to back)."""
    plain_pipeline = Compose([*training_preprocessing(patch, pixdim).transforms, *augmentation(patch).transforms])
    out = {}
    out["uncached"], _ = timed(lambda: Dataset(items, transform=plain_pipeline))
    out["memory first"], memory = timed(lambda: training_dataset(items, patch, pixdim))
    out["memory cached"], _ = timed(lambda: memory)
    cache_dir = workdir / f"cache-{index}"
    out["disk first"], disk = timed(lambda: training_dataset(items, patch, pixdim, cache_dir=cache_dir))
    out["disk cached"], _ = timed(lambda: disk)
    out["disk reopened"], _ = timed(lambda: training_dataset(items, patch, pixdim, cache_dir=cache_dir))
    return out


def run(options: BenchOptions) -> dict:
    size, subjects, repeats, grids = settings(options)
    patch = (32, 32, 32)
    results = []
    with tempfile.TemporaryDirectory(prefix="fedseg-bench-data-") as tmp:
        workdir = Path(tmp)
        site = write_site(workdir / "sites", 1, num_subjects=subjects, size=size, seed=0)
        items = load_site_split(site, seed=0).train
        for pixdim in grids:
            passes = [one_repeat(items, patch, pixdim, workdir, i + len(results) * repeats) for i in range(repeats)]
            seconds = {side: median([p[side] for p in passes]) for side in passes[0]}
            results.append(
                {
                    "pixdim": pixdim,
                    "volume": size,
                    "train_items": len(items),
                    "seconds": seconds,
                    "memory_speedup": median([p["memory first"] / p["memory cached"] for p in passes]),
                    "disk_speedup": median([p["disk first"] / p["disk cached"] for p in passes]),
                    "disk_reopened_speedup": median([p["disk first"] / p["disk reopened"] for p in passes]),
                    "uncached_vs_memory_cached": median([p["uncached"] / p["memory cached"] for p in passes]),
                    "all_seconds": passes,
                }
            )
    print_table(
        f"5. data epoch seconds (median of {repeats}; target first/cached >= {TARGET})",
        [
            "grid",
            "items",
            "uncached",
            "memory first",
            "memory cached",
            "disk first",
            "disk cached",
            "disk reopened",
            "memory x",
            "disk x",
            "reopened x",
            "pass",
        ],
        [
            [
                str(r["pixdim"] or "stored"),
                r["train_items"],
                *r["seconds"].values(),
                r["memory_speedup"],
                r["disk_speedup"],
                r["disk_reopened_speedup"],
                min(r["memory_speedup"], r["disk_speedup"]) >= TARGET,
            ]
            for r in results
        ],
    )
    payload = {"target_speedup": TARGET, "patch": patch, "cases": results}
    write_result("data", options, payload)
    return payload
