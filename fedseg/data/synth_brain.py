"""Synthetic brain-glioma institutions as in BraTS: four co-registered MR modalities and tumour labels.

Each subject is a deformed, rotated head: scalp (skin and fat), skull (cortical bone around fatty
marrow), CSF around the brain, in the interhemispheric fissure and in two lateral ventricles, a
grey-matter cortex ribbon with gyri over the white matter, deep grey nuclei, and a glioma in one
hemisphere. A high-grade glioma (HGG) is a necrotic core in an enhancing rim inside vasogenic edema
that spreads along the white matter; a low-grade one (LGG) is a non-enhancing core with less edema.
The tumour pushes the tissue around it away (mass effect). Tissues mix at their edges (partial
volume, also through thick slices).

Modalities T1, T1-Gd (t1ce), T2 and FLAIR, each with its own tissue contrasts. Labels as in BraTS:
0 background, 1 necrotic / non-enhancing tumour core, 2 peritumoral edema, 4 enhancing tumour.

Institutions differ the way real ones do: field strength and sequences (relative contrasts), gain
per sequence, bias field, noise, voxel spacing and slice thickness, skull-stripped (as BraTS is
distributed) or stored with the skull, stored orientation, tumour grade mix and size, annotator
style (edema drawn looser or tighter) and subject count. `write_brain_site` writes one site in the
BraTS layout `<site>/<id>/<id>_{t1,t1ce,t2,flair,seg}.nii.gz` with an MSD-style dataset.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedseg.atomic import publish_site_folder, site_staging_folder
from fedseg.data.synth import _bias_field, _rotation, _stored, synth_settings

MODALITIES = ("t1", "t1ce", "t2", "flair")
MODALITY_NAMES = ("T1", "T1-Gd", "T2", "FLAIR")
BRAIN_LABELS = {0: "background", 1: "necrotic / non-enhancing tumour core", 2: "edema", 4: "enhancing tumour"}
BRAIN_GENERATOR_VERSION = 2  # bump when the images change, so cached synthetic brain sites are regenerated
TISSUES = ("skin", "fat", "bone", "marrow", "csf", "gm", "wm", "deep", "edema", "nonenh", "enhancing", "necrosis")


def _contrast(
    t1: dict[str, float], t1ce: dict[str, float], t2: dict[str, float], flair: dict[str, float]
) -> dict[str, np.ndarray]:
    """Per tissue, its intensity in (t1, t1ce, t2, flair); T1-Gd is T1 where `t1ce` does not say otherwise."""
    per_modality = (t1, {**t1, **t1ce}, t2, flair)
    return {tissue: np.array([m[tissue] for m in per_modality], np.float32) for tissue in TISSUES}


_T1 = {
    "skin": 0.45,
    "fat": 1.0,
    "bone": 0.04,
    "marrow": 0.75,
    "csf": 0.12,
    "gm": 0.45,
    "wm": 0.7,
    "deep": 0.52,
    "edema": 0.4,
    "nonenh": 0.28,
    "enhancing": 0.48,
    "necrosis": 0.15,
}
_T2 = {
    "skin": 0.35,
    "fat": 0.65,
    "bone": 0.03,
    "marrow": 0.45,
    "csf": 1.0,
    "gm": 0.58,
    "wm": 0.4,
    "deep": 0.5,
    "edema": 0.8,
    "nonenh": 0.92,
    "enhancing": 0.62,
    "necrosis": 0.95,
}
_FLAIR = {
    "skin": 0.35,
    "fat": 0.6,
    "bone": 0.03,
    "marrow": 0.4,
    "csf": 0.06,
    "gm": 0.52,
    "wm": 0.4,
    "deep": 0.48,
    "edema": 1.0,
    "nonenh": 0.72,
    "enhancing": 0.7,
    "necrosis": 0.3,
}
_ENHANCED = {"skin": 0.55, "enhancing": 1.05}

BRAIN_CONTRASTS = {  # field strength and sequences
    "3T": _contrast(_T1, _ENHANCED, _T2, _FLAIR),
    # lower T1 grey/white contrast, weaker enhancement, incomplete CSF suppression
    "1.5T": _contrast(
        {**_T1, "gm": 0.5, "wm": 0.64, "csf": 0.2, "edema": 0.45},
        {**_ENHANCED, "enhancing": 0.98},
        {**_T2, "csf": 0.92, "gm": 0.62, "wm": 0.46, "edema": 0.72, "nonenh": 0.84},
        {**_FLAIR, "csf": 0.16, "gm": 0.5, "wm": 0.44, "edema": 0.82, "nonenh": 0.62},
    ),
    # 3D gradient echo T1 (MPRAGE) and 3D FLAIR: strong grey/white contrast, less bright fat
    "3T-3D": _contrast(
        {**_T1, "fat": 0.8, "gm": 0.38, "wm": 0.8, "csf": 0.06, "marrow": 0.6},
        {**_ENHANCED, "enhancing": 1.0},
        {**_T2, "gm": 0.62, "wm": 0.36, "edema": 0.9},
        {**_FLAIR, "csf": 0.03, "gm": 0.62, "wm": 0.36, "edema": 0.95, "necrosis": 0.2},
    ),
    # 2D spin echo: very bright fat, flat grey/white contrast, bright edema on T1-Gd
    "1.5T-SE": _contrast(
        {**_T1, "gm": 0.48, "wm": 0.6, "csf": 0.24, "edema": 0.46, "nonenh": 0.34},
        {**_ENHANCED, "enhancing": 1.05, "edema": 0.5},
        {**_T2, "csf": 0.88, "gm": 0.56, "wm": 0.46, "edema": 0.68, "necrosis": 0.8},
        {**_FLAIR, "csf": 0.2, "gm": 0.56, "wm": 0.47, "edema": 0.8, "nonenh": 0.6},
    ),
    # low-field open scanner: low contrast everywhere
    "1T-open": _contrast(
        {**_T1, "gm": 0.5, "wm": 0.58, "csf": 0.26, "edema": 0.48, "necrosis": 0.3},
        {**_ENHANCED, "enhancing": 0.95},
        {**_T2, "csf": 0.84, "gm": 0.56, "wm": 0.48, "edema": 0.66, "nonenh": 0.78, "necrosis": 0.78},
        {**_FLAIR, "csf": 0.24, "gm": 0.52, "wm": 0.46, "edema": 0.72, "nonenh": 0.56},
    ),
}


@dataclass(frozen=True)
class BrainInstitution:
    """How one institution's scanner, protocol, annotators and glioma patients look."""

    name: str
    contrast: str  # a key of BRAIN_CONTRASTS
    spacing: tuple[float, float, float]  # mm per voxel (x, y, z); z is the slice direction
    fov: float  # imaged box side relative to the reference box
    noise: float  # Rician noise sigma relative to the brightest tissue
    bias: float  # strength of the multiplicative bias field
    skull_stripped: bool  # zero outside the brain mask, as BraTS is distributed
    hgg_fraction: float  # share of high-grade gliomas
    tumour_scale: tuple[float, float]  # tumour size range
    annotator_mm: float  # edema (whole-tumour) boundary offset: > 0 looser, < 0 tighter
    subjects: float  # subject count relative to the preset's base count
    gains: tuple[float, float, float, float]  # scanner units of the brightest tissue per modality
    lps: bool  # stored in LPS orientation (fedseg reorients to RAS)


BRAIN_INSTITUTIONS = (
    BrainInstitution(
        "A",
        "3T",
        (1.0, 1.0, 1.0),
        1.0,
        0.03,
        0.15,
        True,
        0.8,
        (0.9, 1.2),
        0.0,
        1.0,
        (1000.0, 1200.0, 1500.0, 900.0),
        False,
    ),
    BrainInstitution(
        "B",
        "1.5T",
        (1.0, 1.0, 3.0),
        1.05,
        0.06,
        0.35,
        False,
        0.6,
        (0.8, 1.1),
        1.0,
        2.5,
        (450.0, 520.0, 800.0, 400.0),
        True,
    ),
    BrainInstitution(
        "C",
        "3T-3D",
        (1.0, 1.0, 1.0),
        0.95,
        0.04,
        0.25,
        True,
        0.3,
        (0.8, 1.1),
        -0.5,
        1.5,
        (2400.0, 2600.0, 3000.0, 2000.0),
        False,
    ),
    BrainInstitution(
        "D",
        "1.5T-SE",
        (0.9, 0.9, 5.0),
        1.1,
        0.08,
        0.3,
        False,
        0.9,
        (1.0, 1.3),
        1.0,
        0.5,
        (600.0, 700.0, 900.0, 500.0),
        False,
    ),
    BrainInstitution(
        "E",
        "3T",
        (1.0, 1.0, 2.0),
        1.0,
        0.05,
        0.45,
        True,
        1.0,
        (0.9, 1.3),
        0.5,
        0.3,
        (3000.0, 3300.0, 4000.0, 2800.0),
        True,
    ),
    BrainInstitution(
        "F",
        "1.5T",
        (1.2, 1.2, 1.2),
        1.0,
        0.05,
        0.2,
        True,
        0.5,
        (0.8, 1.1),
        -1.0,
        0.8,
        (800.0, 900.0, 1100.0, 700.0),
        False,
    ),
    BrainInstitution(
        "G",
        "3T-3D",
        (0.8, 0.8, 1.6),
        1.05,
        0.03,
        0.4,
        False,
        0.7,
        (0.9, 1.2),
        0.5,
        2.0,
        (1500.0, 1600.0, 2000.0, 1300.0),
        True,
    ),
    BrainInstitution(
        "H",
        "1.5T-SE",
        (1.0, 1.0, 4.0),
        1.0,
        0.07,
        0.25,
        True,
        0.2,
        (0.8, 1.1),
        1.5,
        0.4,
        (350.0, 420.0, 600.0, 300.0),
        False,
    ),
    BrainInstitution(
        "I",
        "3T",
        (1.0, 1.0, 1.0),
        1.1,
        0.02,
        0.5,
        False,
        0.6,
        (0.8, 1.2),
        -0.5,
        1.2,
        (1800.0, 2000.0, 2500.0, 1600.0),
        True,
    ),
    BrainInstitution(
        "J",
        "1.5T",
        (1.1, 1.1, 2.5),
        0.95,
        0.06,
        0.3,
        True,
        0.85,
        (1.0, 1.3),
        1.0,
        0.6,
        (700.0, 760.0, 1000.0, 600.0),
        False,
    ),
)
BRAIN_OUTSIDE = BrainInstitution(
    "outside",
    "1T-open",
    (1.2, 1.2, 6.0),
    1.1,
    0.07,
    0.35,
    False,
    0.7,
    (0.8, 1.2),
    1.0,
    0.5,
    (250.0, 280.0, 400.0, 220.0),
    True,
)


def brain_institution(site_index: int) -> BrainInstitution:
    """Institution of brain site `site_index` (the ten styles repeat beyond ten sites)."""
    return BRAIN_INSTITUTIONS[site_index % len(BRAIN_INSTITUTIONS)]


def draw_grade(rng: np.random.Generator, inst: BrainInstitution) -> str:
    """ "HGG" or "LGG" with the institution's grade mix: the first draw of every subject's generator."""
    return "HGG" if rng.uniform() < inst.hgg_fraction else "LGG"


def render_brain_subject(
    rng: np.random.Generator, inst: BrainInstitution, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One subject of `inst`: (image float32 (X, Y, Z, 4) in MODALITIES order, label uint8, affine),
    in the stored orientation."""
    subject = _Subject(rng, inst, size)
    contrast = {k: v * rng.uniform(0.95, 1.05, 4).astype(np.float32) for k, v in BRAIN_CONTRASTS[inst.contrast].items()}
    texture = subject.texture[..., None]
    ramp = inst.spacing[0]  # in-plane partial volume over about one voxel
    image = np.zeros((*subject.fine_shape, 4), np.float32)
    for region, tissue in subject.layers:
        occupancy = np.clip(0.5 - subject.sdf[region] / ramp, 0.0, 1.0)
        box = _bounding_box(occupancy > 0)  # inner regions are small: paint only around them
        amplitude = 0.08 if tissue in _TUMOUR else 0.04
        image[box] += occupancy[box][..., None] * (contrast[tissue] * (1.0 + amplitude * texture[box]) - image[box])
    shape = subject.shape
    image = image.reshape(*shape, subject.sub, 4).mean(-2)
    label = _label(subject.sdf, inst.annotator_mm, subject.grade).reshape(*shape, subject.sub)[..., subject.sub // 2]

    channels = []
    for c in range(4):
        channel = image[..., c] * _bias_field(rng, shape, inst.bias)
        noisy = np.hypot(channel + rng.normal(0, inst.noise, shape), rng.normal(0, inst.noise, shape))
        channels.append(noisy * inst.gains[c])
    image = np.stack(channels, axis=-1)
    if inst.skull_stripped:
        brain = (subject.sdf["mask"] < 0).reshape(*shape, subject.sub).mean(-1) > 0.5
        image *= brain[..., None]
    return _stored(image.astype(np.float32), label, inst)


def brain_tissue_map(rng: np.random.Generator, inst: BrainInstitution, size: int) -> np.ndarray:
    """What `render_brain_subject` with the same generator state paints where: per voxel of the stored
    grid (centre of the slice), 0 for air or 1 + the index in TISSUES of the topmost tissue."""
    subject = _Subject(rng, inst, size)
    tissues = np.zeros(subject.fine_shape, np.uint8)
    for region, tissue in subject.layers:
        tissues[subject.sdf[region] < 0] = TISSUES.index(tissue) + 1
    tissues = tissues.reshape(*subject.shape, subject.sub)[..., subject.sub // 2]
    return _stored(np.zeros((*subject.shape, 1), np.float32), tissues, inst)[1]


def write_brain_site(
    root: Path,
    site_index: int,
    num_subjects: int,
    size: int,
    seed: int,
    inst: BrainInstitution | None = None,
    folder: str | None = None,
) -> Path:
    """Write one brain site (BraTS layout + dataset.json) under `root` atomically; reuse it if already there."""
    inst = inst or brain_institution(site_index)
    site_dir = root / (folder or f"site-{site_index}")
    if (site_dir / "dataset.json").exists():
        return site_dir
    with site_staging_folder(site_dir) as tmp:
        training = []
        for i in range(num_subjects):
            key = [seed, site_index, i]
            image, label, affine = render_brain_subject(np.random.default_rng(key), inst, size)
            sid = f"{inst.name.lower()}_{i:03d}"
            (tmp / sid).mkdir()
            for c, modality in enumerate(MODALITIES):
                nib.save(nib.Nifti1Image(image[..., c], affine), tmp / sid / f"{sid}_{modality}.nii.gz")
            nib.save(nib.Nifti1Image(label, affine), tmp / sid / f"{sid}_seg.nii.gz")
            training.append(
                {
                    "image": [f"./{sid}/{sid}_{modality}.nii.gz" for modality in MODALITIES],
                    "label": f"./{sid}/{sid}_seg.nii.gz",
                    "grade": draw_grade(np.random.default_rng(key), inst),
                }
            )
        meta = {
            "name": f"fedseg-synth-brain-{site_dir.name}",
            "description": f"synthetic brain-glioma institution {inst.name} "
            f"(fedseg synth --anatomy brain, seed {seed})",
            "reference": "BraTS layout and labels; institutions as in Sheller et al. 2018/2020",
            "tensorImageSize": "3D",
            "modality": {str(c): name for c, name in enumerate(MODALITY_NAMES)},
            "labels": {str(k): v for k, v in BRAIN_LABELS.items()},
            "numTraining": num_subjects,
            "training": training,
            "test": [],
            "institution": asdict(inst),
            "synth": synth_settings("brain", seed, size),
        }
        return publish_site_folder(tmp, site_dir, meta)


# ------------------------------------------------------------------------------------------ internals
_HEAD_RADII = np.array([0.8, 0.9, 0.84])  # normalised (reference box half-side = 1): x left-right, y, z
_SCALP, _FAT, _SKULL_OUT, _MARROW_OUT, _MARROW_IN, _SKULL_IN, _BRAIN = 0.0, 0.012, 0.065, 0.085, 0.11, 0.13, 0.16
_CORTEX = 0.09  # grey-matter ribbon thickness
_TUMOUR = ("edema", "nonenh", "enhancing", "necrosis")


class _Subject:
    """A drawn head on the fine grid (slices supersampled): signed distances in mm per region."""

    def __init__(self, rng: np.random.Generator, inst: BrainInstitution, size: int) -> None:
        self.grade = draw_grade(rng, inst)
        self.shape = tuple(max(8, round(size * inst.fov / s)) for s in inst.spacing)
        self.sub = min(4, max(1, round(inst.spacing[2] / inst.spacing[0])))  # through-plane supersampling
        self.fine_shape = (self.shape[0], self.shape[1], self.shape[2] * self.sub)
        points = _points(rng, self.fine_shape, inst.spacing, self.sub, size)
        sdf = _regions(rng, points, self.grade == "HGG", inst.tumour_scale)
        self.sdf = {k: (v * (size / 2.0)).astype(np.float32) for k, v in sdf.items()}
        self.sdf["mask"] = self.sdf["brain"] - 1.0  # skull stripping keeps about 1 mm of the CSF around the brain
        self.texture = _random_waves(rng, 8.0)(points)
        core = "enhancing" if self.grade == "HGG" else "nonenh"
        self.layers = (
            ("head", "skin"),
            ("fat", "fat"),
            ("skull", "bone"),
            ("marrow", "marrow"),
            ("csf", "csf"),
            ("brain", "gm"),
            ("wm", "wm"),
            ("deep", "deep"),
            ("ventricles", "csf"),
            ("fissure", "csf"),
            ("edema", "edema"),
            ("core", core),
            ("necrosis", "necrosis"),
        )


def _random_waves(rng: np.random.Generator, frequency: float, count: int = 6) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth random field: sum of random plane waves (about `frequency` radians per unit), in [-1, 1]."""
    directions = rng.normal(0.0, frequency, (3, count)).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, count).astype(np.float32)
    mean = np.full(count, 1.0 / count, np.float32)
    return lambda points: np.cos(points @ directions + phases) @ mean


def _points(
    rng: np.random.Generator,
    fine_shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    sub: int,
    size: int,
) -> np.ndarray:
    """Fine-grid voxel centres in normalised head coordinates, with a random head pose."""
    steps = (spacing[0], spacing[1], spacing[2] / sub)
    axes = [
        ((np.arange(n) + 0.5 - n / 2) * s / (size / 2)).astype(np.float32)
        for n, s in zip(fine_shape, steps, strict=True)
    ]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    rotation = _rotation(*np.radians(rng.uniform(-7, 7, 3))).astype(np.float32)
    shift = rng.uniform(-0.04, 0.04, 3).astype(np.float32)
    return (grid - shift) @ rotation


def _regions(rng: np.random.Generator, p: np.ndarray, hgg: bool, tumour_scale: tuple[float, float]) -> dict:
    """Signed distance (normalised units, negative inside) of every region, from a randomly drawn head."""
    u = rng.uniform
    head_r = _HEAD_RADII * u(0.93, 1.03) * u(0.96, 1.04, 3)
    scale = head_r / _HEAD_RADII
    head_waves, gyri, wm_waves = _random_waves(rng, 3.0), _random_waves(rng, 10.0), _random_waves(rng, 10.0)

    def skull_shape(points: np.ndarray) -> np.ndarray:
        return _ellipsoid(points, np.zeros(3), head_r) + 0.02 * head_waves(points)

    head = skull_shape(p)
    brain = head + _BRAIN + 0.015 * gyri(p)

    # the glioma, in one hemisphere; the tissue around it is pushed away (q: where it came from)
    side = rng.choice((-1.0, 1.0))
    centre = _tumour_centre(rng, head_r - _BRAIN) * np.array([side, 1.0, 1.0])
    radius = u(0.16, 0.26) * u(*tumour_scale)
    core_r = radius * u(0.8, 1.2, 3)
    spread = u(0.08, 0.2) if hgg else u(0.04, 0.1)
    q = _mass_effect(p, centre, 0.35 if hgg else 0.2, radius + spread)

    wm = np.maximum(skull_shape(q) + _BRAIN + _CORTEX + 0.035 * wm_waves(q), brain + 0.03)
    ventricle_waves = _random_waves(rng, 4.0)
    ventricle_r = np.array([0.07, 0.28, 0.1]) * scale * u(0.8, 1.25)
    ventricles = np.minimum(
        *(
            _ellipsoid(
                (q - np.array([s * 0.1, 0.03, 0.1]) * scale) @ _rotation(0.0, 0.0, s * 0.25).astype(np.float32),
                np.zeros(3),
                ventricle_r,
            )
            for s in (-1.0, 1.0)
        )
    ) + 0.015 * ventricle_waves(q)
    deep = np.minimum(
        *(
            _ellipsoid(q, np.array([s * 0.16, -0.02, -0.02]) * scale, np.array([0.08, 0.14, 0.09]) * scale)
            for s in (-1.0, 1.0)
        )
    )
    fissure = np.maximum(np.maximum(np.abs(q[..., 0]) - 0.012, 0.15 - q[..., 2]), brain)

    core = np.maximum(_ellipsoid(p, centre, core_r) + 0.03 * _random_waves(rng, 6.0)(p), brain)
    if hgg:
        necrosis_c = centre + core_r * u(-0.15, 0.15, 3)
        necrosis = _ellipsoid(p, necrosis_c, core_r * u(0.4, 0.6)) + 0.02 * _random_waves(rng, 7.0)(p)
        necrosis = np.maximum(necrosis, core + 0.05)  # always inside an enhancing rim
    else:
        necrosis = np.full(p.shape[:-1], 1.0, np.float32)
    edema = core - spread + 0.04 * _random_waves(rng, 5.0)(p)
    edema = np.minimum(np.maximum(edema, np.maximum(wm - 0.02, brain)), core)  # spreads along the white matter
    return {
        "head": head - _SCALP,
        "fat": head + _FAT,
        "skull": head + _SKULL_OUT,
        "marrow": np.maximum(head + _MARROW_OUT, -(head + _MARROW_IN)),
        "csf": head + _SKULL_IN,
        "brain": brain,
        "wm": wm,
        "deep": deep,
        "ventricles": ventricles,
        "fissure": fissure,
        "edema": edema,
        "core": core,
        "necrosis": necrosis,
    }


def _ellipsoid(points: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Approximate signed distance (normalised units) to an ellipsoid; negative inside."""
    q = (points - centre.astype(np.float32)) / radii.astype(np.float32)
    return (np.sqrt(np.einsum("...i,...i->...", q, q)) - 1.0) * np.float32(radii.min())


def _tumour_centre(rng: np.random.Generator, brain_r: np.ndarray) -> np.ndarray:
    """A tumour centre well inside the brain, in the hemisphere of positive x (the caller picks the side)."""
    while True:
        v = rng.uniform((0.2, -0.6, -0.4), (0.65, 0.6, 0.5))
        if v @ v < 0.55:
            return v * brain_r


def _mass_effect(p: np.ndarray, centre: np.ndarray, strength: float, reach: float) -> np.ndarray:
    """Where the tissue seen at `p` came from when a mass at `centre` pushed it outwards (no folding: strength < 1)."""
    offset = p - centre.astype(np.float32)
    squared = np.einsum("...i,...i->...", offset, offset)[..., None]
    return centre.astype(np.float32) + offset * (1.0 - strength * np.exp(-squared / reach**2))


def _label(sdf: dict[str, np.ndarray], offset_mm: float, grade: str) -> np.ndarray:
    """BraTS labels as an annotator who draws the edema's outer boundary `offset_mm` out would draw them."""
    label = np.zeros(sdf["core"].shape, np.uint8)
    label[sdf["edema"] < offset_mm] = 2
    core = sdf["core"] < 0
    if grade == "HGG":
        label[core] = 4
        label[core & (sdf["necrosis"] < 0)] = 1
    else:
        label[core] = 1
    return label


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    """Smallest box holding every True voxel of `mask` (an empty box when there is none)."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(hits[0], hits[-1] + 1) if hits.size else slice(0, 0))
    return tuple(box)
