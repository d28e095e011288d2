"""Which difference of the synthetic outside institution makes a trained model fail there?

Renders the outside institution's subjects again (same seeds, same anatomy) with one of its
properties set to that of site A at a time — T2 contrast instead of fat-suppressed T2, 1 mm instead
of 3 mm slices, no bias field, RAS instead of LPS storage, no annotator offset — and with T2 contrast
plus site A's annotators or patients (gland size, transition-zone share, lesion rate), and scores
fedseg model files on every variant. The property whose removal restores the Dice is the cause.

    python bench/outside_causes.py results/quality-cpu/arms/centralized--pooled/model.pt \\
        results/quality-cpu/arms/private--site-1/model.pt --size small

Prints one line per model (mean Dice per variant); `--json FILE` also writes them. The subjects are
written to a temporary folder; about a minute per model on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from fedseg.data.datalist import load_datalist
from fedseg.data.datasets import evaluation_dataset
from fedseg.data.synth import INSTITUTIONS, OUTSIDE, OUTSIDE_KEY, PRESETS, Institution, write_site
from fedseg.model_checkpoint import CheckpointError, ModelCheckpoint

SITE_A = INSTITUTIONS[0]


def variants() -> dict[str, Institution]:
    """The outside institution, then with one property of site A each."""
    return {
        "outside": OUTSIDE,
        "T2 contrast": dataclasses.replace(OUTSIDE, contrast=SITE_A.contrast),
        "1 mm slices": dataclasses.replace(OUTSIDE, spacing=(*OUTSIDE.spacing[:2], SITE_A.spacing[2])),
        "no bias field": dataclasses.replace(OUTSIDE, bias=0.0),
        "RAS storage": dataclasses.replace(OUTSIDE, lps=False),
        "no annotator offset": dataclasses.replace(OUTSIDE, annotator_mm=0.0),
        "T2 + no annotator offset": dataclasses.replace(OUTSIDE, contrast=SITE_A.contrast, annotator_mm=0.0),
        "T2 + site-A patients": dataclasses.replace(OUTSIDE, contrast=SITE_A.contrast, **_patients(SITE_A)),
    }


def _patients(inst: Institution) -> dict[str, object]:
    """The patient population of `inst`: gland size, transition-zone share, lesion rate."""
    return {"gland_scale": inst.gland_scale, "tz_fraction": inst.tz_fraction, "lesion_rate": inst.lesion_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="fedseg model files")
    parser.add_argument("--size", default="small", choices=tuple(PRESETS), help="fedseg synth size of the study")
    parser.add_argument("--seed", type=int, default=0, help="fedseg synth seed of the study")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:  # every model file checked before any subject is rendered
        models = {path: ModelCheckpoint.load(path) for path in args.models}
    except CheckpointError as error:
        parser.error(str(error))
    size, base = PRESETS[args.size]
    subjects = max(4, round(base * OUTSIDE.subjects))  # as fedseg synth writes the outside institution
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            name: write_site(Path(tmp), OUTSIDE_KEY, subjects, size, args.seed, inst=inst, folder=f"v{i}")
            for i, (name, inst) in enumerate(variants().items())
        }
        for path, model in models.items():
            trainer = model.trainer(device="cpu")
            scores = {}
            for name, folder in folders.items():
                data = evaluation_dataset(load_datalist(folder), model.pixdim, cache_dir=Path(tmp) / "cache")
                scores[name] = round(float(trainer.evaluate(data).per_case.mean()), 3)
            results[str(path)] = scores
            print(path, "  ".join(f"{name}: {value:.3f}" for name, value in scores.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
