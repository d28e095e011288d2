"""Quick seeded synthetic sites: small 3D volumes with an organ and a lesion inside it.

Each site differs in contrast, noise and intensity offset so sites are non-IID.
Volumes are written as NIfTI with an MSD-style `dataset.json`, so synthetic and real
sites take the same path through the loader.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {"0": "background", "1": "organ", "2": "lesion"}


@dataclass(frozen=True)
class SiteStyle:
    """Scanner-like appearance of one synthetic site."""

    organ_intensity: float
    lesion_intensity: float
    noise: float
    offset: float


def site_style(site_index: int) -> SiteStyle:
    """Deterministic style per site; site 1 has inverted organ/lesion contrast."""
    styles = [
        SiteStyle(organ_intensity=1.0, lesion_intensity=2.0, noise=0.25, offset=0.0),
        SiteStyle(organ_intensity=1.8, lesion_intensity=0.6, noise=0.35, offset=0.3),
        SiteStyle(organ_intensity=0.7, lesion_intensity=1.4, noise=0.5, offset=-0.2),
    ]
    return styles[site_index % len(styles)]


def make_subject(rng: np.random.Generator, size: int, style: SiteStyle) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair of shape (size, size, size); label values 0, 1, 2."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), axis=-1).astype(np.float32)
    centre = rng.uniform(0.4, 0.6, 3) * size
    radii = rng.uniform(0.18, 0.3, 3) * size
    organ = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    lesion_centre = centre + rng.uniform(-0.4, 0.4, 3) * radii
    lesion_radius = rng.uniform(0.25, 0.4) * radii.min()
    lesion = (((grid - lesion_centre) / lesion_radius) ** 2).sum(-1) <= 1.0
    lesion &= organ
    label = organ.astype(np.uint8) + lesion.astype(np.uint8)
    image = 0.2 + style.offset + style.organ_intensity * organ + (style.lesion_intensity - style.organ_intensity) * lesion
    image = image + rng.normal(0.0, style.noise, image.shape)
    return image.astype(np.float32), label


def write_site(root: Path, site_index: int, num_subjects: int, size: int, seed: int) -> Path:
    """Write one site's volumes and dataset.json under `root` (atomically); return the site dir."""
    site_dir = root / f"site-{site_index}"
    if (site_dir / "dataset.json").exists():
        return site_dir
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, site_index])
    style = site_style(site_index)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".site-{site_index}-"))
    (tmp / "imagesTr").mkdir()
    (tmp / "labelsTr").mkdir()
    training = []
    for i in range(num_subjects):
        image, label = make_subject(rng, size, style)
        name = f"case_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": f"fedseg-synthetic-site-{site_index}",
        "modality": {"0": "synthetic"},
        "labels": LABELS,
        "numTraining": num_subjects,
        "training": training,
        "test": [],
    }
    (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, site_dir)
    except OSError:  # another process wrote the same site first: its copy is identical
        _remove_tree(tmp)
    return site_dir


def synthetic_root(num_subjects: int, size: int, seed: int) -> Path:
    """Cache folder for quick synthetic sites (override with $FEDSEG_CACHE)."""
    base = Path(os.environ.get("FEDSEG_CACHE", Path.home() / ".cache" / "fedseg"))
    return base / "synthetic" / f"n{num_subjects}-s{size}-seed{seed}"


def _remove_tree(path: Path) -> None:
    for child in sorted(path.rglob("*"), reverse=True):
        child.rmdir() if child.is_dir() else child.unlink()
    path.rmdir()
