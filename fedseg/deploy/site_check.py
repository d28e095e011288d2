"""`fedseg site check`: is this site ready to join? Validate its data, then run the model once.

The dry forward pass loads one volume through the same preprocessing the federation uses
and runs sliding-window inference with an untrained model of the run's architecture, so a
site finds out about memory, file or shape trouble before the first round, not during it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fedseg.config import RunConfig
from fedseg.data.datalist import Problem, load_datalist
from fedseg.data.datasets import evaluation_dataset
from fedseg.data.validate import ValidationReport, validate_site
from fedseg.errors import first_line
from fedseg.model_spec import intensity_window, model_spec
from fedseg.trainer import SegmentationTrainer


@dataclass(frozen=True)
class DryRun:
    """What one forward pass on one of the site's volumes showed."""

    volume_shape: tuple[int, ...]
    channels: int
    output_shape: tuple[int, ...]
    seconds: float
    device: str
    parameters: int

    def line(self, config: RunConfig) -> str:
        return (
            f"dry run: {config.model} ({self.parameters:,} parameters) on {self.device}: volume "
            f"{'x'.join(map(str, self.volume_shape))}, {self.channels} channel(s) -> "
            f"{self.output_shape[0]} output maps in {self.seconds:.2f} s"
        )


def check_site_ready(
    data_dir: str | Path, config: RunConfig, allow_outside: bool | None = None
) -> tuple[ValidationReport, DryRun | None]:
    """Validate the site's data (label values of the run's label scheme; channels: the run's
    `in-channels` when set, else whatever the subjects agree on); when it has no errors, do the dry
    forward pass with a network taking that many channels. A failing dry run (inside MONAI or the
    network, e.g. out of memory) becomes a `dry-run` error of the report, with the cause."""
    report = validate_site(
        data_dir,
        channels=config.in_channels or None,
        label_values=config.labels.allowed_label_values,
        allow_outside=allow_outside,
    )
    if not report.ok:
        return report, None
    try:
        return report, dry_forward(data_dir, config, report.channels or 1, allow_outside)
    except Exception as err:  # noqa: BLE001 - whatever fails in MONAI or torch is what the check must report
        text = first_line(err)
        cause = err.__cause__ if isinstance(err, RuntimeError) and err.__cause__ is not None else None
        if cause is not None:  # MONAI wraps a transform's error: "applying transform ..." -> say what failed
            text = f"{text}: {type(cause).__name__}: {first_line(cause)}"
        report.problems.append(
            Problem("error", "dry-run", str(data_dir), f"the dry forward pass failed: {type(err).__name__}: {text}")
        )
        return report, None


def dry_forward(data_dir: str | Path, config: RunConfig, in_channels: int, allow_outside: bool | None = None) -> DryRun:
    """Sliding-window logits of an untrained model on the site's first volume."""
    labels = config.labels
    items = load_datalist(data_dir, allow_outside)[:1]
    volume = evaluation_dataset(
        items, config.spacing, label_mapping=labels.label_mapping, window=intensity_window(config)
    )[0]
    volume = volume["image"]
    spec = model_spec(config)
    trainer = SegmentationTrainer(
        model_name=spec.name,
        model_args=spec.args,
        num_classes=config.num_classes,
        patch_size=config.patch_size,
        in_channels=in_channels,
        batch_size=config.batch_size,
        labels=labels,
    )
    started = time.perf_counter()
    logits = trainer.predict_logits(torch.as_tensor(volume)[None])
    if not torch.isfinite(logits).all():
        raise ValueError("the dry forward pass produced non-finite outputs")
    return DryRun(
        volume_shape=tuple(volume.shape[1:]),
        channels=int(volume.shape[0]),
        output_shape=tuple(logits.shape[1:]),
        seconds=time.perf_counter() - started,
        device=str(trainer.device),
        parameters=sum(p.numel() for p in trainer.model.parameters()),
    )
