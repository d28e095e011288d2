"""Realistic synthetic institutions: pelvic MR-like phantoms with prostate zones, as NIfTI + dataset.json.

Each subject is a deformed, rotated pelvis crop: body outline, subcutaneous fat, muscle, femoral
bones, periprostatic fat, rectum (wall and gas), bladder touching the gland, and the prostate with
its peripheral zone wrapping a transition zone (and sometimes a dark lesion). Tissues mix at their
edges (partial volume, also through thick slices).

Labels: 0 background, 1 peripheral zone, 2 transition zone, 3 bladder, 4 lesion; `num_classes`
(3 to 5, background included) keeps the first ones (an unlabelled lesion is labelled as its zone).

Institutions differ the way real ones do: contrast (site 1 is T1-like, which inverts the zones and
the bladder), bias field, noise, voxel spacing and slice thickness, field of view, stored orientation,
annotator style (labels drawn looser or tighter), subject count and class prevalence (gland and
transition-zone size, lesion rate). `synthesize` writes `<out>/site-0 ... site-<n-1>` and
`<out>/outside` (an institution no federation trains on); everything is seeded.

With `anatomy="brain"` the same functions write brain-glioma institutions in the BraTS layout
instead (fedseg.data.synth_brain: four modalities, labels 0, 1, 2, 4; `num_classes` is not used).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np

from fedseg.atomic import publish_site_folder, site_staging_folder
from fedseg.cache import cache_root
from fedseg.progress import track

if TYPE_CHECKING:
    from fedseg.data.synth_brain import BrainInstitution

ANATOMIES = ("pelvis", "brain")

STRUCTURES = ("peripheral zone", "transition zone", "bladder", "lesion")
MIN_CLASSES, MAX_CLASSES = 3, len(STRUCTURES) + 1
GENERATOR_VERSION = 2  # bump when the images change, so cached synthetic sites are regenerated

T2 = {
    "fat": 0.85,
    "muscle": 0.3,
    "bone": 0.08,
    "marrow": 0.55,
    "urine": 1.0,
    "wall": 0.35,
    "gas": 0.02,
    "pz": 0.75,
    "tz": 0.42,
    "lesion": 0.22,
}
T1_LIKE = {
    "fat": 0.9,
    "muscle": 0.5,
    "bone": 0.05,
    "marrow": 0.8,
    "urine": 0.12,
    "wall": 0.45,
    "gas": 0.02,
    "pz": 0.3,
    "tz": 0.62,
    "lesion": 0.5,
}
T2_LOW_CONTRAST = {**T2, "pz": 0.62, "tz": 0.48, "urine": 0.8, "lesion": 0.35}
T2_FAT_SUPPRESSED = {**T2, "fat": 0.15, "marrow": 0.12}


@dataclass(frozen=True)
class Institution:
    """How one institution's scanner, protocol, annotators and patients look."""

    name: str
    contrast: str  # a key of CONTRASTS
    spacing: tuple[float, float, float]  # mm per voxel (x, y, z)
    fov: float  # imaged box side relative to the reference crop
    noise: float  # Rician noise sigma relative to the brightest tissue
    bias: float  # strength of the multiplicative bias field
    annotator_mm: float  # label boundary offset: > 0 looser, < 0 tighter
    subjects: float  # subject count relative to the preset's base count
    gland_scale: tuple[float, float]  # gland size range (habitus)
    tz_fraction: tuple[float, float]  # transition-zone size relative to the gland (BPH)
    lesion_rate: float
    gain: float  # scanner units of the brightest tissue
    lps: bool  # stored in LPS orientation (fedseg reorients to RAS)


CONTRASTS = {"T2": T2, "T1-like": T1_LIKE, "T2-low-contrast": T2_LOW_CONTRAST, "T2-fat-suppressed": T2_FAT_SUPPRESSED}

INSTITUTIONS = (
    Institution("A", "T2", (1.0, 1.0, 1.0), 1.0, 0.03, 0.15, 0.0, 1.0, (0.95, 1.1), (0.45, 0.6), 0.3, 1000.0, False),
    Institution("B", "T1-like", (0.8, 0.8, 1.6), 0.9, 0.05, 0.35, 1.0, 0.6, (1.0, 1.2), (0.55, 0.75), 0.5, 400.0, True),
    Institution(
        "C",
        "T2-low-contrast",
        (1.2, 1.2, 2.4),
        1.15,
        0.08,
        0.25,
        -0.8,
        1.5,
        (0.85, 1.0),
        (0.4, 0.5),
        0.15,
        2500.0,
        False,
    ),
)
OUTSIDE = Institution(
    "outside",
    "T2-fat-suppressed",
    (0.9, 0.9, 3.0),
    0.95,
    0.06,
    0.4,
    0.5,
    0.5,
    (0.9, 1.15),
    (0.5, 0.7),
    0.4,
    1800.0,
    True,
)
OUTSIDE_KEY = 1000  # seed key of the outside institution
# annotator offsets synthesize accepts for the outside institution: tighter than -2 mm the thin zones (and the
# brain's edema) start to vanish at `tiny`; looser than +3 mm is past any site's convention (-0.8 to +1 mm)
ANNOTATOR_MM = (-2.0, 3.0)
SYNTH_MIN_SUBJECTS = 4  # the fewest subjects synthesize writes for an institution
# the most sites and (base or outside) subjects synthesize writes, refused before writing anything: as many
# as a run config takes (fedseg.config.UPPER_BOUNDS 'min-sites', 'synthetic-subjects'; not imported here,
# they would load torch); the seed as a run's (0 to 2^32 - 1)
MAX_SITES = 10_000
MAX_SUBJECTS = 1000
MAX_SEED = 2**32 - 1

PRESETS = {  # name: (reference crop side in mm ≈ voxels at 1 mm, base subjects per site)
    "tiny": (32, 6),
    "small": (48, 16),
    "full": (96, 40),
}


def institution(site_index: int) -> Institution:
    """Institution of site `site_index` (the three styles repeat beyond three sites)."""
    return INSTITUTIONS[site_index % len(INSTITUTIONS)]


def render_subject(
    rng: np.random.Generator, inst: Institution, size: int, num_classes: int = MIN_CLASSES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One subject of `inst`: (image float32, label uint8, affine), arrays in the stored orientation."""
    shape = tuple(max(8, round(size * inst.fov / s)) for s in inst.spacing)
    sub = max(1, round(inst.spacing[2] / inst.spacing[0]))  # through-plane supersampling
    points = _anatomical_points(rng, shape, sub, inst, size)
    half_mm = size / 2.0
    fields = _Fields(rng, points)
    sdf = _structures(rng, points, inst, fields, half_mm)
    tissue = {k: v * rng.uniform(0.95, 1.05) for k, v in CONTRASTS[inst.contrast].items()}

    ramp = inst.spacing[0]  # in-plane partial volume over about one voxel
    image = np.zeros(points.shape[:-1], np.float32)
    for name, value in _LAYERS:
        occupancy = np.clip(0.5 - sdf[name] / ramp, 0.0, 1.0)
        texture = 1.0 + (0.12 * fields.texture if name in ("tz", "muscle") else 0.03 * fields.texture)
        image += occupancy * (tissue[value] * texture - image)
    image = image.reshape(shape[0], shape[1], shape[2], sub).mean(-1)
    label = _label(sdf, inst.annotator_mm, num_classes).reshape(*shape, sub)[..., sub // 2]

    image = image * _bias_field(rng, shape, inst.bias)
    sigma = inst.noise
    image = np.hypot(image + rng.normal(0, sigma, shape), rng.normal(0, sigma, shape)) * inst.gain
    return _stored(image.astype(np.float32), label, inst)


def write_site(
    root: Path,
    site_index: int,
    num_subjects: int,
    size: int,
    seed: int,
    num_classes: int = MIN_CLASSES,
    inst: Institution | BrainInstitution | None = None,
    folder: str | None = None,
    anatomy: str = "pelvis",
) -> Path:
    """Write one site (NIfTI + dataset.json) under `root` atomically; reuse it if already there.

    With `anatomy="brain"` a brain-glioma site (`inst` a BrainInstitution; `num_classes` not used).
    """
    if _check_anatomy(anatomy) == "brain":
        from fedseg.data.synth_brain import BrainInstitution, write_brain_site

        if inst is not None and not isinstance(inst, BrainInstitution):
            raise TypeError(f"a brain site needs a BrainInstitution, got {type(inst).__name__}")
        return write_brain_site(root, site_index, num_subjects, size, seed, inst, folder)
    if not MIN_CLASSES <= num_classes <= MAX_CLASSES:
        raise ValueError(f"num_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {num_classes}")
    if inst is not None and not isinstance(inst, Institution):
        raise TypeError(f"a pelvis site needs an Institution, got {type(inst).__name__}")
    inst = inst or institution(site_index)
    site_dir = root / (folder or f"site-{site_index}")
    if (site_dir / "dataset.json").exists():
        return site_dir
    with site_staging_folder(site_dir) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        training = []
        for i in range(num_subjects):
            rng = np.random.default_rng([seed, site_index, i])
            image, label, affine = render_subject(rng, inst, size, num_classes)
            name = f"{inst.name.lower()}_{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), tmp / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), tmp / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        meta = {
            "name": f"fedseg-synth-{site_dir.name}",
            "description": f"synthetic institution {inst.name} (fedseg synth, seed {seed})",
            "modality": {"0": inst.contrast},
            "labels": {"0": "background", **{str(k): STRUCTURES[k - 1] for k in range(1, num_classes)}},
            "numTraining": num_subjects,
            "training": training,
            "test": [],
            "institution": asdict(inst),
            "synth": synth_settings("pelvis", seed, size, num_classes),
        }
        return publish_site_folder(tmp, site_dir, meta)


def synth_settings(anatomy: str, seed: int, size: int, num_classes: int = MIN_CLASSES) -> dict[str, object]:
    """What a synthetic site's images depend on besides its institution and subject count, as stored in
    its dataset.json ("synth"): a rerun of `synthesize` keeps a site written with the same settings."""
    if anatomy == "brain":
        from fedseg.data.synth_brain import BRAIN_GENERATOR_VERSION

        return {"anatomy": anatomy, "generator": BRAIN_GENERATOR_VERSION, "seed": seed, "size": size}
    return {"anatomy": anatomy, "generator": GENERATOR_VERSION, "seed": seed, "size": size, "classes": num_classes}


def synthesize(
    out: str | Path,
    preset: str = "small",
    seed: int = 0,
    num_sites: int = 3,
    num_classes: int = MIN_CLASSES,
    overwrite: bool = False,
    anatomy: str = "pelvis",
    subjects: int = 0,
    outside_annotator_mm: float | None = None,
    outside_subjects: int = 0,
) -> list[Path]:
    """Write `num_sites` institutions `<out>/site-k` and `<out>/outside` of `anatomy`; return their folders.

    `subjects` > 0 replaces the preset's base subject count (each institution still scales it by its
    own factor): cohorts sized like real ones at small volumes, e.g. `tiny` with 270 subjects gives
    every site at least 100 training subjects; many sites are cheap at `tiny` (~0.04 s per subject).
    `outside_annotator_mm` replaces the outside institution's annotator offset (None: its own): the
    same outside images, labelled by an annotator with another convention (0: the true boundary),
    so a study can tell how much of a model's outside Dice is the annotator's convention.
    `outside_subjects` > 0 replaces the outside institution's subject count (0: its own share of the
    base): subjects are seeded one by one, so a larger outside set begins with the same scans.
    A rerun after an interruption keeps the sites already written with the same settings and
    finishes the rest; a site folder written otherwise needs `overwrite`.
    """
    _check_anatomy(anatomy)
    if preset not in PRESETS:
        raise ValueError(f"unknown size '{preset}'; choose one of: {', '.join(PRESETS)}")
    _check_counts(seed, num_sites, subjects, outside_subjects)
    low, high = ANNOTATOR_MM
    if outside_annotator_mm is not None and not low <= outside_annotator_mm <= high:  # NaN fails too
        raise ValueError(f"outside_annotator_mm must be in [{low:g}, {high:g}] mm, got {outside_annotator_mm}")
    size, base = PRESETS[preset]
    base = subjects or base
    out = Path(out)
    if anatomy == "brain":
        from fedseg.data.synth_brain import BRAIN_OUTSIDE, brain_institution

        plan: list[tuple[int, Institution | BrainInstitution, str]]
        plan = [(k, brain_institution(k), f"site-{k}") for k in range(num_sites)]
        outside: Institution | BrainInstitution = BRAIN_OUTSIDE
    else:
        plan = [(k, institution(k), f"site-{k}") for k in range(num_sites)]
        outside = OUTSIDE
    if outside_annotator_mm is not None:
        outside = replace(outside, annotator_mm=float(outside_annotator_mm) + 0.0)  # + 0.0: -0 is stored as 0
    if outside_subjects:
        outside = replace(outside, subjects=outside_subjects / base)
    plan.append((OUTSIDE_KEY, outside, "outside"))
    counts = {folder: max(SYNTH_MIN_SUBJECTS, round(base * inst.subjects)) for _, inst, folder in plan}
    settings = synth_settings(anatomy, seed, size, num_classes)
    for _, inst, folder in plan:
        path = out / folder
        if overwrite and path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif overwrite and (path.exists() or path.is_symlink()):
            path.unlink()
        elif fault := _not_written_with(path, inst, counts[folder], settings):
            raise FileExistsError(f"{path}: {fault} (use overwrite to replace the synthetic sites)")
    return [
        write_site(out, key, counts[folder], size, seed, num_classes, inst, folder, anatomy)
        for key, inst, folder in track(plan, "writing sites")
    ]


def synthetic_root(
    num_subjects: int, size: int, seed: int, num_classes: int = MIN_CLASSES, anatomy: str = "pelvis"
) -> Path:
    """Cache folder of the quick on-the-fly synthetic sites (override the base with $FEDSEG_CACHE)."""
    if _check_anatomy(anatomy) == "brain":
        from fedseg.data.synth_brain import BRAIN_GENERATOR_VERSION

        return cache_root() / f"synth-brain-v{BRAIN_GENERATOR_VERSION}" / f"n{num_subjects}-s{size}-seed{seed}"
    return cache_root() / f"synth-v{GENERATOR_VERSION}" / f"n{num_subjects}-s{size}-c{num_classes}-seed{seed}"


# ------------------------------------------------------------------------------------------ internals
def _not_written_with(site_dir: Path, inst: Institution | BrainInstitution, count: int, settings: dict) -> str:
    """Why `site_dir` is not a finished synthetic site of `inst` with `count` subjects and `settings`
    (what an interrupted `synthesize` left, which a rerun with the same options keeps); "" if it is, or absent."""
    if not site_dir.exists() and not site_dir.is_symlink():
        return ""
    try:
        meta = json.loads((site_dir / "dataset.json").read_text())
    except (OSError, ValueError):
        return "already exists, without a readable dataset.json"
    if not isinstance(meta, dict) or "synth" not in meta:
        return "already exists, not written by this version of fedseg synth"
    same = meta.get("institution") == json.loads(json.dumps(asdict(inst))) and meta.get("numTraining") == count
    return "" if same and meta["synth"] == settings else "already exists, written with other settings"


def _check_counts(seed: int, num_sites: int, subjects: int, outside_subjects: int) -> None:
    """ValueError naming the first of synthesize's counts out of range (see MAX_SITES)."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be 0 to {MAX_SEED}, got {seed}")
    if not 1 <= num_sites <= MAX_SITES:
        raise ValueError(f"sites must be 1 to {MAX_SITES}, got {num_sites}")
    if subjects < 0:
        raise ValueError(f"subjects must be >= 0 (0: the preset's count), got {subjects}")
    if outside_subjects != 0 and outside_subjects < SYNTH_MIN_SUBJECTS:
        raise ValueError(
            f"outside_subjects must be 0 (the institution's share) or >= {SYNTH_MIN_SUBJECTS}, got {outside_subjects}"
        )
    for key, value in (("subjects", subjects), ("outside_subjects", outside_subjects)):
        if value > MAX_SUBJECTS:
            raise ValueError(f"{key} must be <= {MAX_SUBJECTS}, got {value}")


def _check_anatomy(anatomy: str) -> str:
    if anatomy not in ANATOMIES:
        raise ValueError(f"unknown anatomy '{anatomy}'; choose one of: {', '.join(ANATOMIES)}")
    return anatomy


# (region, tissue) painted in order; later regions cover earlier ones
_LAYERS = (
    ("body", "fat"),
    ("muscle", "muscle"),
    ("bone", "bone"),
    ("marrow", "marrow"),
    ("periprostatic", "fat"),
    ("rectum", "wall"),
    ("gas", "gas"),
    ("bladder_wall", "wall"),
    ("bladder", "urine"),
    ("gland", "pz"),
    ("tz", "tz"),
    ("lesion", "lesion"),
)


class _Fields:
    """Smooth random fields over the anatomy: shape deformations and tissue texture."""

    def __init__(self, rng: np.random.Generator, points: np.ndarray) -> None:
        self.gland, self.tz, self.bladder = (_waves(rng, points, frequency=3.0) for _ in range(3))
        self.texture = _waves(rng, points, frequency=8.0)


def _waves(rng: np.random.Generator, points: np.ndarray, frequency: float, count: int = 6) -> np.ndarray:
    """Sum of random plane waves (about `frequency` radians per unit), scaled to [-1, 1]."""
    directions = rng.normal(0.0, frequency, (3, count)).astype(np.float32)
    phases = rng.uniform(0, 2 * np.pi, count).astype(np.float32)
    return np.cos(points @ directions + phases).sum(-1) / count


def _anatomical_points(
    rng: np.random.Generator, shape: tuple[int, ...], sub: int, inst: Institution, size: int
) -> np.ndarray:
    """Fine-grid voxel centres in normalised anatomy coordinates (crop half-side = 1), with pose jitter."""
    axes = []
    for n, s in zip(
        (shape[0], shape[1], shape[2] * sub), (inst.spacing[0], inst.spacing[1], inst.spacing[2] / sub), strict=True
    ):
        axes.append(((np.arange(n) + 0.5 - n / 2) * s / (size / 2)).astype(np.float32))
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    angles = np.radians(rng.uniform(-8, 8, 3))
    rotation = _rotation(*angles).astype(np.float32)
    shift = rng.uniform(-0.06, 0.06, 3).astype(np.float32)
    return (grid - shift) @ rotation


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rx @ ry @ rz


def _ellipsoid(points: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Approximate signed distance (normalised units) to an ellipsoid; negative inside."""
    q = (points - centre.astype(np.float32)) / radii.astype(np.float32)
    return (np.sqrt((q * q).sum(-1)) - 1.0) * np.float32(radii.min())


def _cylinder_z(points: np.ndarray, centre_xy: np.ndarray, radii_xy: np.ndarray) -> np.ndarray:
    """Approximate signed distance to an elliptic cylinder along z."""
    return _ellipsoid(points[..., :2], centre_xy, radii_xy)


def _structures(
    rng: np.random.Generator, p: np.ndarray, inst: Institution, fields: _Fields, half_mm: float
) -> dict[str, np.ndarray]:
    """Signed distance in mm of every region, from a randomly drawn anatomy."""
    u = rng.uniform
    scale = u(*inst.gland_scale)
    gland_c = np.array([u(-0.04, 0.04), u(-0.1, 0.0), u(-0.2, -0.1)])
    gland_r = np.array([0.42, 0.32, 0.36]) * scale * u(0.92, 1.08, 3)
    tz_r = gland_r * u(*inst.tz_fraction) * np.array([1.0, 1.1, 1.0])
    tz_c = gland_c + np.array([0.0, 0.45, 0.2]) * (gland_r - tz_r)
    bladder_r = np.array([0.42, 0.34, 0.3]) * u(0.8, 1.15)
    bladder_c = gland_c + np.array([u(-0.04, 0.04), 0.12, gland_r[2] + bladder_r[2] * 0.9])
    rectum_r = np.array([0.2, 0.15]) * u(0.85, 1.15)
    rectum_c = np.array([gland_c[0], gland_c[1] - gland_r[1] - rectum_r[1] * 0.95])
    bone_x = u(0.68, 0.76)

    gland = _ellipsoid(p, gland_c, gland_r) + 0.035 * fields.gland
    sdf = {
        "body": np.linalg.norm(p[..., :2] / np.array([0.98, 0.84]), axis=-1) - 1.0,
        "muscle": np.linalg.norm(p[..., :2] / np.array([0.86, 0.7]), axis=-1) - 1.0,
        "bone": np.minimum(*(_cylinder_z(p, np.array([sx * bone_x, 0.0]), np.array([0.16, 0.17])) for sx in (-1, 1))),
        "periprostatic": _ellipsoid(p, gland_c, gland_r * 1.3),
        "rectum": _cylinder_z(p, rectum_c, rectum_r),
        "gas": _cylinder_z(p, rectum_c, rectum_r * 0.55),
        "bladder_wall": _ellipsoid(p, bladder_c, bladder_r + 0.03) + 0.03 * fields.bladder,
        "bladder": _ellipsoid(p, bladder_c, bladder_r) + 0.03 * fields.bladder,
        "gland": gland,
        "tz": np.maximum(_ellipsoid(p, tz_c, tz_r) + 0.03 * fields.tz, gland),
    }
    sdf["marrow"] = sdf["bone"] + 0.05
    lesion_r = np.full(3, u(0.06, 0.1))
    lesion_c = gland_c + gland_r * np.array([u(-0.5, 0.5), -0.65, u(-0.3, 0.3)])
    lesion = _ellipsoid(p, lesion_c, lesion_r) if u() < inst.lesion_rate else np.full(p.shape[:-1], 1.0)
    sdf["lesion"] = np.maximum(lesion, np.maximum(gland, -sdf["tz"]))  # inside the peripheral zone
    return {k: (v * half_mm).astype(np.float32) for k, v in sdf.items()}


def _label(sdf: dict[str, np.ndarray], offset_mm: float, num_classes: int) -> np.ndarray:
    """Label map as an annotator with a systematic boundary offset would draw it."""
    label = np.zeros(sdf["gland"].shape, np.uint8)
    if num_classes > 3:
        label[sdf["bladder"] < offset_mm] = 3
    label[sdf["gland"] < offset_mm] = 1
    label[(sdf["tz"] < offset_mm) & (sdf["gland"] < 0)] = 2
    if num_classes > 4:
        label[(sdf["lesion"] < offset_mm) & (label == 1)] = 4
    return label


def _bias_field(rng: np.random.Generator, shape: tuple[int, ...], strength: float) -> np.ndarray:
    """Smooth multiplicative field exp(strength · quadratic polynomial), as from a receive coil."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    terms = (x, y, z, x * x, y * y, x * y)
    coeffs = rng.uniform(-1, 1, len(terms))
    poly = sum(c * t for c, t in zip(coeffs, terms, strict=True))
    return np.exp(strength * poly / np.abs(coeffs).sum())


def _stored(
    image: np.ndarray, label: np.ndarray, inst: Institution | BrainInstitution
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arrays (an image may carry modalities on a 4th axis) and affine as the institution stores them
    (RAS, or LPS with flipped x and y); the grid is the label's."""
    shape = np.array(label.shape)
    spacing = np.array(inst.spacing)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (0.5 - shape / 2) * spacing
    if inst.lps:
        image, label = image[::-1, ::-1].copy(), label[::-1, ::-1].copy()
        affine[:2, :2] *= -1
        affine[:2, 3] *= -1
    return image, label, affine
