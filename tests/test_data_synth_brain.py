"""`fedseg synth --anatomy brain`: BraTS-like gliomas, right per modality, different per institution."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.data.synth import synthesize, synthetic_root, write_site
from fedseg.data.synth_brain import (
    BRAIN_INSTITUTIONS,
    BRAIN_OUTSIDE,
    MODALITIES,
    TISSUES,
    BrainInstitution,
    brain_institution,
    brain_tissue_map,
    draw_grade,
    render_brain_subject,
    write_brain_site,
)

T1, T1CE, T2, FLAIR = range(4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("brain")
    result = CliRunner().invoke(app, ["synth", str(out), "--size", "tiny", "--anatomy", "brain", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


def tissue_means(inst: BrainInstitution, grade: str = "HGG") -> dict[str, np.ndarray]:
    """Mean intensity per modality of every tissue (plus label 4) of a subject of `grade`: the institution's
    contrasts, without noise or bias field, on 1 mm voxels (thin structures in thick slices are mixed)."""
    inst = dataclasses.replace(inst, noise=0.0, bias=0.0, spacing=(1.0, 1.0, 1.0))
    seed = next(s for s in range(100) if draw_grade(np.random.default_rng(s), inst) == grade)
    image, label, _ = render_brain_subject(np.random.default_rng(seed), inst, 40)
    tissues = brain_tissue_map(np.random.default_rng(seed), inst, 40)
    image = image / np.array(inst.gains, np.float32)
    means = {t: image[tissues == k + 1].mean(0) for k, t in enumerate(TISSUES) if np.any(tissues == k + 1)}
    if np.any(label == 4):
        means["label 4"] = image[label == 4].mean(0)
    return means


def test_layout_dataset_json_and_shared_grid(tiny: Path) -> None:
    names = sorted(p.name for p in tiny.iterdir())
    assert names == ["outside", "site-0", "site-1", "site-2"]
    meta = {n: json.loads((tiny / n / "dataset.json").read_text()) for n in names}
    assert {n: m["numTraining"] for n, m in meta.items()} == {"outside": 4, "site-0": 6, "site-1": 15, "site-2": 9}
    site = meta["site-1"]
    assert site["modality"] == {"0": "T1", "1": "T1-Gd", "2": "T2", "3": "FLAIR"}
    assert site["labels"] == {
        "0": "background",
        "1": "necrotic / non-enhancing tumour core",
        "2": "edema",
        "4": "enhancing tumour",
    }
    assert site["institution"]["name"] == "B" and site["institution"]["skull_stripped"] is False
    for entry in site["training"]:
        sid = Path(entry["label"]).parent.name
        assert entry["image"] == [f"./{sid}/{sid}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
        assert entry["label"] == f"./{sid}/{sid}_seg.nii.gz"
        images = [nib.load(tiny / "site-1" / path) for path in entry["image"]]
        label = nib.load(tiny / "site-1" / entry["label"])
        for image in images:
            assert image.shape == label.shape and len(image.shape) == 3
            assert np.array_equal(image.affine, label.affine)
            assert image.get_data_dtype() == np.float32
        assert label.get_data_dtype() == np.uint8
        assert set(np.unique(np.asanyarray(label.dataobj))) <= {0, 1, 2, 4}
    assert nib.aff2axcodes(label.affine) == ("L", "P", "S")  # site B stores LPS
    assert label.header.get_zooms() == (1.0, 1.0, 3.0)


def test_grades_decide_the_labels() -> None:
    inst = BRAIN_INSTITUTIONS[0]  # 1 mm, 80 % high grade
    grades = []
    for i in range(10):
        grade = draw_grade(np.random.default_rng([5, 0, i]), inst)
        _, label, _ = render_brain_subject(np.random.default_rng([5, 0, i]), inst, 32)
        values = set(np.unique(label).tolist())
        assert values <= {0, 1, 2, 4}
        assert values == {0, 1, 2, 4} if grade == "HGG" else values == {0, 1, 2}, (i, grade, values)
        grades.append(grade)
    assert set(grades) == {"HGG", "LGG"}


def test_modality_contrasts_are_right_at_every_institution() -> None:
    for inst in (*BRAIN_INSTITUTIONS, BRAIN_OUTSIDE):
        index = inst.name
        m = tissue_means(inst)
        assert m["wm"][T1] > m["gm"][T1] + 0.05 > m["csf"][T1] + 0.1, index  # T1: WM > GM > CSF
        assert m["csf"][T2] > m["gm"][T2] > m["wm"][T2] + 0.05, index  # T2: CSF bright, GM > WM
        assert m["csf"][FLAIR] < m["wm"][FLAIR] - 0.1 < m["gm"][FLAIR], index  # FLAIR: CSF suppressed
        assert m["edema"][FLAIR] > m["gm"][FLAIR] + 0.1 and m["edema"][T2] > m["wm"][T2] + 0.1, index
        assert m["edema"][T1] < m["wm"][T1] - 0.1, index
        assert m["label 4"][T1CE] > m["wm"][T1CE] + 0.05, index  # high grade: bright enhancing rim on T1-Gd
        assert m["label 4"][T1CE] > m["label 4"][T1] + 0.2, index
        assert m["necrosis"][T1CE] < m["label 4"][T1CE] - 0.3 and m["necrosis"][T2] > m["wm"][T2] + 0.2, index
        if inst.hgg_fraction < 1:  # low grade: a non-enhancing core, edema brighter on FLAIR
            m = tissue_means(inst, "LGG")
            assert "label 4" not in m and m["nonenh"][T1CE] < m["wm"][T1CE] - 0.2, index
            assert m["nonenh"][T2] > m["edema"][T2] + 0.05 and m["nonenh"][FLAIR] < m["edema"][FLAIR] - 0.05, index


def test_institutions_differ() -> None:
    stripped, with_skull = BRAIN_INSTITUTIONS[0], BRAIN_INSTITUTIONS[1]
    assert stripped.skull_stripped and not with_skull.skull_stripped
    image, _, _ = render_brain_subject(np.random.default_rng(1), stripped, 32)
    tissues = brain_tissue_map(np.random.default_rng(1), stripped, 32)
    outside_brain = np.isin(tissues, [0, *(TISSUES.index(t) + 1 for t in ("skin", "fat", "bone", "marrow"))])
    assert np.all(image[outside_brain & (np.abs(np.indices(tissues.shape) - 16).max(0) > 15)] == 0)  # box edge
    assert np.mean(image[outside_brain] == 0) > 0.95 and np.all(image[tissues == TISSUES.index("wm") + 1] > 0)

    image, _, _ = render_brain_subject(np.random.default_rng(1), with_skull, 32)
    tissues = brain_tissue_map(np.random.default_rng(1), with_skull, 32)
    assert np.mean(image[tissues == 0] > 0) > 0.95  # noise in the air around the head
    clean = dataclasses.replace(with_skull, noise=0.0, bias=0.0)
    image, _, _ = render_brain_subject(np.random.default_rng(1), clean, 48)
    tissues = brain_tissue_map(np.random.default_rng(1), clean, 48)
    scalp_fat, wm = tissues == TISSUES.index("fat") + 1, tissues == TISSUES.index("wm") + 1
    assert image[scalp_fat, T1].mean() > image[wm, T1].mean()  # scalp fat bright on T1, kept with the skull

    thick = BRAIN_INSTITUTIONS[3]
    _, label, _ = render_brain_subject(np.random.default_rng(1), thick, 32)
    assert thick.spacing == (0.9, 0.9, 5.0) and label.shape == (39, 39, 8)  # 5 mm slices: few of them

    # field strength and sequence: grey/white contrast on T1 differs between 3T-3D and 1.5T spin echo
    c3, c15 = (tissue_means(BRAIN_INSTITUTIONS[k]) for k in (2, 3))
    assert c3["wm"][T1] - c3["gm"][T1] > 2 * (c15["wm"][T1] - c15["gm"][T1])
    assert {i.hgg_fraction for i in BRAIN_INSTITUTIONS} >= {0.2, 0.3, 1.0}  # grade mix
    assert (
        min(i.annotator_mm for i in BRAIN_INSTITUTIONS) <= -1 and max(i.annotator_mm for i in BRAIN_INSTITUTIONS) >= 1.5
    )
    assert len({i.name for i in BRAIN_INSTITUTIONS}) >= 10 and BRAIN_OUTSIDE.contrast not in {
        i.contrast for i in BRAIN_INSTITUTIONS
    }
    assert brain_institution(len(BRAIN_INSTITUTIONS) + 1) == BRAIN_INSTITUTIONS[1]


def test_annotator_offset_moves_the_edema_boundary() -> None:
    loose = dataclasses.replace(BRAIN_INSTITUTIONS[0], annotator_mm=2.0)
    tight = dataclasses.replace(BRAIN_INSTITUTIONS[0], annotator_mm=-1.0)
    _, loose_label, _ = render_brain_subject(np.random.default_rng(2), loose, 32)
    _, tight_label, _ = render_brain_subject(np.random.default_rng(2), tight, 32)
    assert np.all(loose_label[tight_label > 0] > 0)
    assert (loose_label == 2).sum() > 1.3 * (tight_label == 2).sum()
    assert np.array_equal(loose_label == 4, tight_label == 4)  # the core is drawn alike


def test_seeded_deterministic_and_cached_apart(tmp_path: Path) -> None:
    a = write_brain_site(tmp_path / "a", 2, 2, 24, seed=7)
    b = write_site(tmp_path / "b", 2, 2, 24, seed=7, anatomy="brain")
    c = write_brain_site(tmp_path / "c", 2, 2, 24, seed=8)
    for modality in (*MODALITIES, "seg"):
        name = f"c_001/c_001_{modality}.nii.gz"
        assert np.array_equal(nib.load(a / name).get_fdata(), nib.load(b / name).get_fdata())
        assert not np.array_equal(nib.load(a / name).get_fdata(), nib.load(c / name).get_fdata())
    assert "brain" in str(synthetic_root(4, 24, 0, anatomy="brain"))
    assert synthetic_root(4, 24, 0, anatomy="brain") != synthetic_root(4, 24, 0)


def test_rejects_unknown_anatomy_and_overwrites(tiny: Path) -> None:
    result = CliRunner().invoke(app, ["synth", str(tiny / "new"), "--anatomy", "liver"])
    assert result.exit_code == 2 and "unknown anatomy 'liver'" in result.output
    with pytest.raises(FileExistsError, match="site-0: already exists, written with other settings"):
        synthesize(tiny, "tiny", seed=4, anatomy="brain")
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*.nii.gz")}
    assert synthesize(tiny, "tiny", seed=3, anatomy="brain")[0] == tiny / "site-0"  # the same settings: kept
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*.nii.gz")} == before
