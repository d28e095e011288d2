"""Cross-site Dice matrix on `fedseg synth` institutions: does a single-site model fail away from home?

Trains one model per site on that site's training split, and one on all sites pooled, then scores
every model on every site's test split and on the outside institution (all its subjects).

    python bench/site_shift.py --size small --steps 300 --pooled-steps 600
    python bench/site_shift.py --anatomy brain --size tiny --steps 150 --pooled-steps 300 --patch 24
    python bench/site_shift.py --size small --steps 150 --pooled-steps 300 --patch 24 --augmentation shift --invert 0.3

Prints the matrix (mean foreground Dice over the classes the test cases have) and, per single-site
model, home Dice, worst away Dice and the gap; `--json FILE` also writes them. Runs in a few minutes
on 2 CPU cores. Brain sites (four modalities, labels 0, 1, 2, 4) train a 5-class softmax network
whose class 3 stays empty and is left out of the mean.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedseg.data.datalist import load_datalist
from fedseg.data.datasets import evaluation_dataset, training_dataset
from fedseg.data.sites import load_site_split
from fedseg.data.synth import ANATOMIES, synthesize
from fedseg.data.synth_brain import MODALITIES
from fedseg.data.transforms import AUGMENTATIONS
from fedseg.trainer import EvalResult, SegmentationTrainer

PIXDIM = (1.0, 1.0, 1.0)  # the prostate study's resampling (BraTS is 1 mm isotropic too)
BRAIN_CLASSES = 5  # labels 0, 1, 2, 4 as softmax classes 0 .. 4 (3 stays empty)


def train(items: list[dict], steps: int, args: argparse.Namespace, cache: Path) -> SegmentationTrainer:
    """A UNet trained for about `steps` optimiser steps on `items`."""
    torch.manual_seed(args.seed)
    patch = (args.patch,) * 3
    brain = args.anatomy == "brain"
    trainer = SegmentationTrainer(
        "unet",
        BRAIN_CLASSES if brain else args.num_classes,
        patch,
        in_channels=len(MODALITIES) if brain else 1,
        batch_size=2,
        learning_rate=args.lr,
    )
    epochs = math.ceil(steps / math.ceil(len(items) / trainer.batch_size))
    train_set = training_dataset(
        items, patch, PIXDIM, cache_dir=cache, augmentation=args.augmentation, invert_probability=args.invert
    )
    trainer.fit(train_set, epochs=epochs, seed=args.seed)
    return trainer


def mean_dice(result: EvalResult) -> float:
    """Mean Dice over the foreground classes some test case has (the brain's empty class 3 is left out)."""
    present = result.per_case[:, ~np.isnan(result.per_case).all(axis=0)]
    return float(np.mean(np.nanmean(present, axis=0))) if present.size else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--anatomy", default="pelvis", choices=ANATOMIES)
    parser.add_argument("--size", default="small", choices=("tiny", "small", "full"))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--num-classes", type=int, default=3, help="pelvis classes (not used for brain)")
    parser.add_argument("--steps", type=int, default=300, help="optimiser steps per single-site model")
    parser.add_argument("--pooled-steps", type=int, default=600, help="optimiser steps of the pooled model")
    parser.add_argument("--patch", type=int, default=32, help="cubic training patch side (voxels)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--augmentation", default="standard", choices=AUGMENTATIONS, help="training augmentation preset"
    )
    parser.add_argument("--invert", type=float, default=0.0, help="'shift' only: contrast inversion probability")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "sites", Path(tmp) / "cache"
        folders = synthesize(root, args.size, args.seed, args.sites, args.num_classes, anatomy=args.anatomy)
        splits = [load_site_split(folder, args.seed) for folder in folders[:-1]]
        tests = {f.name: s.test for f, s in zip(folders, splits, strict=False)} | {
            "outside": load_datalist(folders[-1])
        }
        test_sets = {name: evaluation_dataset(items, PIXDIM, cache_dir=cache) for name, items in tests.items()}
        plans = {f.name: (s.train, args.steps) for f, s in zip(folders, splits, strict=False)}  # not the outside one
        plans["pooled"] = ([item for s in splits for item in s.train], args.pooled_steps)
        matrix: dict[str, dict[str, float]] = {}
        for name, (items, steps) in plans.items():
            trainer = train(items, steps, args, cache)
            matrix[name] = {test: mean_dice(trainer.evaluate(data)) for test, data in test_sets.items()}
            scores = " ".join(f"{test} {dice:.3f}" for test, dice in matrix[name].items())
            print(f"{name} ({len(items)} subjects, {time.perf_counter() - started:.0f} s): {scores}", flush=True)

    sites = list(test_sets)
    print("\nmean foreground Dice (rows: trained on, columns: tested on)")
    print(f"{'':>8} " + " ".join(f"{s:>8}" for s in sites))
    for name, row in matrix.items():
        print(f"{name:>8} " + " ".join(f"{row[s]:8.3f}" for s in sites))
    gaps = {}
    for name in plans:
        if name == "pooled":
            continue
        away = {s: d for s, d in matrix[name].items() if s not in (name, "outside")}
        worst = min(away, key=away.get) if away else name
        gaps[name] = {
            "home": matrix[name][name],
            "worst_away_site": worst,
            "worst_away": matrix[name][worst],
            "gap": matrix[name][name] - matrix[name][worst],
        }
        print(
            f"{name}: home {gaps[name]['home']:.3f}, worst away {worst} {gaps[name]['worst_away']:.3f},"
            f" gap {gaps[name]['gap']:.3f}"
        )
    pooled_min = min(matrix["pooled"][s] for s in sites if s != "outside")
    print(f"pooled: lowest site Dice {pooled_min:.3f}; total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "matrix": matrix,
                    "gaps": gaps,
                    "pooled_min": pooled_min,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
