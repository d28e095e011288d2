"""DP-SGD recipe pilot: train one site's model with (or without) DP-SGD, report validation Dice, ε and time.

Used to choose the run-config presets of configs/experiment-dp-sgd-cohort.toml (docs/privacy-recipe.md).
One process, one site, no Flower: the same SegmentationTrainer, datasets and SitePrivacy as a site.

    fedseg synth data/dp-sgd --size tiny --sites 2 --subjects 270
    OMP_NUM_THREADS=1 python -m bench.dp_recipe data/dp-sgd/site-1 --epochs 10 --noise 1.0 --clip 1.0 \
        --lr 0.003 --batch 32 --multiplicity 4 [--init-from results/dp-public/.../final-model.pt]

With `--epochs 0` it only scores the starting model (`--init-from`) on the test splits of every
site given, e.g. `data/dp-clients/site-{0..49}`: the floor a private model has to beat.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fedseg.data.datasets import evaluation_dataset, training_dataset
from fedseg.data.sites import load_site_split
from fedseg.model_args import parse_model_args
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.optim import optimizer_factory
from fedseg.privacy import DPSettings, PrivacyLedger, SitePrivacy
from fedseg.trainer import SegmentationTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path, nargs="+", help="site folder(s); several only with --epochs 0")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--noise", type=float, default=0.0, help="σ; 0: no DP")
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument("--batch", type=int, default=32, help="expected logical batch (subjects)")
    parser.add_argument("--physical", type=int, default=8)
    parser.add_argument("--multiplicity", type=int, default=1)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--spacing", type=float, default=2.0)
    parser.add_argument("--model-args", default="channels=(8, 16, 32), strides=(2, 2), num_res_units=1")
    parser.add_argument("--init-from", default="")
    parser.add_argument("--eval-every", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(0)
    patch, spacing = (args.patch,) * 3, (args.spacing,) * 3
    if args.epochs == 0:
        score_start_model(args, patch, spacing)
        return
    args.site = args.site[0]
    split = load_site_split(args.site, seed=0)
    cache = Path(tempfile.gettempdir()) / "fedseg-dp-recipe-cache" / args.site.name
    dp = args.noise > 0
    train = training_dataset(split.train, patch, spacing, cache, samples_per_volume=args.multiplicity if dp else 2)
    val = evaluation_dataset(split.val, spacing, cache)
    trainer = SegmentationTrainer(
        "unet",
        3,
        patch,
        batch_size=args.batch if dp else 4,
        learning_rate=args.lr,
        dp_compatible=True,
        optimizer=optimizer_factory("adam"),
        model_args=parse_model_args(args.model_args),
    )
    if args.init_from:
        trainer.set_weights(ModelCheckpoint.load(args.init_from).state_dict)
    start_dice = trainer.evaluate(val).mean_dice if args.init_from else 0.0
    privacy = None
    if dp:
        settings = DPSettings(
            args.noise, args.clip, 1e-5, physical_batch_size=args.physical, augmentation_multiplicity=args.multiplicity
        )
        privacy = SitePrivacy(settings, PrivacyLedger(Path(tempfile.mkdtemp()) / "ledger.json"))
    started, curve = time.perf_counter(), []
    every = args.eval_every or args.epochs
    for epoch in range(0, args.epochs, every):
        trainer.fit(train, epochs=min(every, args.epochs - epoch), seed=epoch, privacy=privacy)
        curve.append(round(trainer.evaluate(val).mean_dice, 4))
    print(
        json.dumps(
            {
                **vars(args),
                "site": str(args.site),
                "init_from": args.init_from,
                "train": len(split.train),
                "start_dice": round(start_dice, 4),
                "val_dice": curve[-1],
                "curve": curve,
                "epsilon": round(privacy.epsilon, 3) if privacy else None,
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


def score_start_model(args: argparse.Namespace, patch: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    """Mean test Dice over the cases of every given site of the `--init-from` model, untrained."""
    trainer = SegmentationTrainer("unet", 3, patch, model_args=parse_model_args(args.model_args))
    trainer.set_weights(ModelCheckpoint.load(args.init_from).state_dict)
    cases = []
    for site in args.site:
        test = evaluation_dataset(load_site_split(site, seed=0).test, spacing)
        cases += list(np.nanmean(trainer.evaluate(test).per_case, axis=1))  # a case: mean over its scored structures
    print(
        json.dumps(
            {
                "init_from": args.init_from,
                "sites": len(args.site),
                "test_cases": len(cases),
                "test_dice": round(float(np.nanmean(cases)), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
