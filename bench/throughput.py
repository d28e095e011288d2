"""Benchmark 1: client training throughput (voxels/s) of SegmentationTrainer.fit vs a bare MONAI loop.

Both sides train the same network (fedseg.models.build_model) on the same cached random batches,
with the same patch, batch size, DiceCELoss, Adam and device (bf16 autocast on CUDA, as the trainer).
The client side is `fit(epochs=1, seed=...)` as the ClientApp calls it; the bare side is the plain
MONAI loop. Sides alternate (ABAB) and the ratio is the median of the per-pair ratios. Target >= 0.97.
"""

from __future__ import annotations

import math

import torch
from monai.data import DataLoader, Dataset
from monai.losses import DiceCELoss

from bench.common import BenchOptions, interleaved, median, paired_ratios, print_table, synchronize, write_result
from fedseg.models import build_model
from fedseg.trainer import SegmentationTrainer

TARGET = 0.97
NUM_CLASSES = 3
LEARNING_RATE = 1e-3


def cases(options: BenchOptions) -> list[dict]:
    """(model, patch, batch, samples per epoch, repeats, compiled) settings for this device and mode."""
    if options.device == "cuda":
        base = [dict(model="unet", patch=96, batch=2), dict(model="segresnet", patch=96, batch=2)]
        extra = {"samples": 20 if options.quick else 60, "repeats": 5 if options.quick else 9}
        compiled = [dict(model="segresnet", patch=96, batch=2, compiled=True)]
        return [{**c, **extra} for c in base + compiled]
    if options.quick:
        return [dict(model="unet", patch=24, batch=2, samples=16, repeats=11)]  # 8 steps: 2 were mostly noise
    return [dict(model=m, patch=48, batch=2, samples=8, repeats=9) for m in ("unet", "segresnet")]


def random_items(count: int, patch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Cached training samples: a channel-first image and label of one patch each."""
    gen = torch.Generator().manual_seed(seed)
    shape = (1, patch, patch, patch)
    return [
        {
            "image": torch.randn(shape, generator=gen),
            "label": torch.randint(0, NUM_CLASSES, shape, generator=gen).float(),
        }
        for _ in range(count)
    ]


def bare_epoch(model: torch.nn.Module, dataset: Dataset, batch: int, device: torch.device) -> None:
    """The plain MONAI training loop: loader, Adam, DiceCELoss, bf16 autocast on CUDA."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    model.train()
    for item in loader:
        image, label = item["image"].to(device), item["label"].to(device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = loss_fn(model(image), label)
        loss.backward()
        optimizer.step()
    synchronize(device)


def measure(case: dict, device: torch.device) -> dict:
    """Median voxels/s of both sides and the median paired ratio client/bare."""
    dataset = Dataset(random_items(case["samples"], case["patch"]))
    compiled = case.get("compiled", False)
    torch.manual_seed(0)
    trainer = SegmentationTrainer(
        case["model"],
        NUM_CLASSES,
        [case["patch"]] * 3,
        batch_size=case["batch"],
        learning_rate=LEARNING_RATE,
        device=device,
        compile=compiled,
    )
    torch.manual_seed(0)
    bare_model = build_model(case["model"], 1, NUM_CLASSES).to(device)
    bare_forward = torch.compile(bare_model) if compiled else bare_model
    rounds = iter(range(10**6))

    def client() -> None:
        trainer.fit(dataset, epochs=1, seed=next(rounds))
        synchronize(device)

    sides = {"client": client, "bare": lambda: bare_epoch(bare_forward, dataset, case["batch"], device)}
    interleaved(sides, repeats=1)  # warm-up (allocator, kernels, compilation)
    times = interleaved(sides, case["repeats"])
    voxels = case["samples"] * math.prod([case["patch"]] * 3)
    ratios = paired_ratios(times["bare"], times["client"])  # client voxels/s over bare voxels/s
    return {
        **case,
        "params_m": sum(p.numel() for p in bare_model.parameters()) / 1e6,
        "client_mvox_s": voxels / median(times["client"]) / 1e6,
        "bare_mvox_s": voxels / median(times["bare"]) / 1e6,
        "ratio": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "seconds": times,
    }


def run(options: BenchOptions) -> dict:
    device = torch.device(options.device)
    results = [measure(case, device) for case in cases(options)]
    print_table(
        f"1. client training throughput vs bare MONAI loop ({device.type}; target ratio >= {TARGET})",
        [
            "model",
            "params M",
            "patch x batch",
            "compiled",
            "client Mvox/s",
            "bare Mvox/s",
            "ratio (median)",
            "range",
            "pass",
        ],
        [
            [
                r["model"],
                r["params_m"],
                f"{r['patch']}^3 x {r['batch']}",
                r.get("compiled", False),
                r["client_mvox_s"],
                r["bare_mvox_s"],
                r["ratio"],
                f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}",
                r["ratio"] >= TARGET,
            ]
            for r in results
        ],
    )
    payload = {"target_ratio": TARGET, "cases": results}
    write_result("throughput", options, payload)
    return payload
