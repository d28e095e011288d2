"""`fedseg synth`: seeded, anatomy-like, and different per institution in the ways that matter."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy.ndimage import binary_erosion
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.data.synth import INSTITUTIONS, render_subject, synthesize, write_site
from fedseg.data.validate import validate_site


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    result = CliRunner().invoke(app, ["synth", str(out), "--size", "tiny", "--num-classes", "5", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return out


def ras(path: Path) -> np.ndarray:
    return np.asanyarray(nib.as_closest_canonical(nib.load(path)).dataobj)


def zone_means(inst_index: int) -> tuple[float, float]:
    """Mean noiseless intensity inside the peripheral (1) and transition (2) zones (edges eroded)."""
    inst = dataclasses.replace(INSTITUTIONS[inst_index], noise=0.0, bias=0.0)
    image, label, _ = render_subject(np.random.default_rng(0), inst, 48)
    image = image / image.max()
    return float(image[binary_erosion(label == 1)].mean()), float(image[binary_erosion(label == 2)].mean())


def test_layout_subject_imbalance_and_all_classes(tiny: Path) -> None:
    names = sorted(p.name for p in tiny.iterdir())
    assert names == ["outside", "site-0", "site-1", "site-2"]
    counts = {n: json.loads((tiny / n / "dataset.json").read_text())["numTraining"] for n in names}
    assert counts == {"outside": 4, "site-0": 6, "site-1": 4, "site-2": 9}
    labels = np.concatenate([ras(p).ravel() for n in names for p in (tiny / n / "labelsTr").glob("*.nii.gz")])
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
    for name in names:
        report = validate_site(tiny / name)
        assert report.ok and report.num_classes == 5, report.lines()


def test_institutions_differ_in_contrast_spacing_and_orientation(tiny: Path) -> None:
    (pz0, tz0), (pz1, tz1) = zone_means(0), zone_means(1)
    assert pz0 > tz0 + 0.2 and pz1 < tz1 - 0.1  # T2: bright peripheral zone; T1-like site: inverted
    headers = {n: nib.load(next((tiny / n / "imagesTr").glob("*.nii.gz"))) for n in ("site-0", "site-1", "site-2")}
    assert [h.header.get_zooms() for h in headers.values()] == [(1.0, 1.0, 1.0), (0.8, 0.8, 1.6), (1.2, 1.2, 2.4)]
    assert [nib.aff2axcodes(h.affine) for h in headers.values()] == [("R", "A", "S"), ("L", "P", "S"), ("R", "A", "S")]


def test_structures_touch_and_edges_have_partial_volume() -> None:
    _, label, _ = render_subject(np.random.default_rng(0), INSTITUTIONS[0], 40, num_classes=4)
    gland = label == 1
    for axis in range(3):  # the bladder (3) and the transition zone (2) border the peripheral zone
        shifted = np.roll(gland, 1, axis=axis)
        if np.any(shifted & (label == 3)) and np.any(shifted & (label == 2)):
            break
    else:
        pytest.fail("peripheral zone touches neither bladder nor transition zone")
    noiseless = dataclasses.replace(INSTITUTIONS[0], noise=0.0, bias=0.0)
    clean, _, _ = render_subject(np.random.default_rng(0), noiseless, 40, num_classes=4)
    levels = np.unique(np.round(clean / clean.max(), 2))
    assert len(levels) > 30  # mixed edge voxels and texture, not a few flat tissue values


def test_annotator_style_offsets_label_boundaries() -> None:
    loose = dataclasses.replace(INSTITUTIONS[0], annotator_mm=1.5)
    tight = dataclasses.replace(INSTITUTIONS[0], annotator_mm=-1.5)
    _, loose_label, _ = render_subject(np.random.default_rng(1), loose, 32)
    _, tight_label, _ = render_subject(np.random.default_rng(1), tight, 32)
    assert np.all(loose_label[tight_label > 0] > 0)
    assert (loose_label > 0).sum() > 1.3 * (tight_label > 0).sum()


def test_seeded_and_deterministic(tmp_path: Path) -> None:
    a = write_site(tmp_path / "a", 1, 2, 24, seed=7)
    b = write_site(tmp_path / "b", 1, 2, 24, seed=7)
    c = write_site(tmp_path / "c", 1, 2, 24, seed=8)
    name = "imagesTr/b_001.nii.gz"
    assert np.array_equal(ras(a / name), ras(b / name))
    assert not np.array_equal(ras(a / name), ras(c / name))


def test_refuses_to_overwrite_and_rejects_bad_options(tiny: Path) -> None:
    with pytest.raises(FileExistsError, match="site-0: already exists"):
        synthesize(tiny, "tiny", seed=3)
    result = CliRunner().invoke(app, ["synth", str(tiny / "new"), "--size", "huge"])
    assert result.exit_code == 2 and "unknown size 'huge'" in result.output
    with pytest.raises(ValueError, match=r"num_classes must be in \[3, 5\]"):
        write_site(tiny / "x", 0, 1, 16, 0, num_classes=6)


def is_label(path: Path) -> bool:
    """A label file of the MSD (labelsTr/) or the BraTS (<subject>_seg) layout."""
    return "labelsTr" in path.parts or path.name.endswith("_seg.nii.gz")


@pytest.mark.parametrize("anatomy", ["pelvis", "brain"])
def test_outside_annotator_relabels_the_same_outside_images(tmp_path: Path, anatomy: str) -> None:
    own = synthesize(tmp_path / "own", "tiny", seed=2, num_sites=1, anatomy=anatomy)
    options = ["--size", "tiny", "--sites", "1", "--seed", "2", "--anatomy", anatomy, "--outside-annotator-mm", "0"]
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "true"), *options])
    assert result.exit_code == 0, result.output
    relabelled = tmp_path / "true"
    for folder in ("site-0", "outside"):
        assert sorted((own[0].parent / folder).rglob("*.nii.gz")) != []
        for path in sorted((own[0].parent / folder).rglob("*.nii.gz")):
            twin = relabelled / folder / path.relative_to(own[0].parent / folder)
            assert np.array_equal(ras(path), ras(twin)) == (folder == "site-0" or not is_label(path)), twin
    own_meta = json.loads((own[0].parent / "outside" / "dataset.json").read_text())["institution"]
    true_meta = json.loads((relabelled / "outside" / "dataset.json").read_text())["institution"]
    assert own_meta["annotator_mm"] > 0 and true_meta["annotator_mm"] == 0.0
    own_voxels, true_voxels = (
        sum(int((ras(p) > 0).sum()) for p in (root / "outside").rglob("*.nii.gz") if is_label(p))
        for root in (own[0].parent, relabelled)
    )
    assert true_voxels < own_voxels  # the outside institution's own annotator draws looser


OUTSIDE_REFUSALS = [
    *(
        ("--outside-annotator-mm", value, f"outside_annotator_mm must be in [-2, 3] mm, got {float(value)}")
        for value in ("nan", "inf", "-2.5", "3.5")  # beyond the anatomy
    ),
    *(
        ("--outside-subjects", value, f"outside_subjects must be 0 (the institution's share) or >= 4, got {value}")
        for value in ("-1", "1", "3")  # below an institution's count
    ),
]


@pytest.mark.parametrize(("option", "value", "message"), OUTSIDE_REFUSALS)
def test_outside_options_refuse_bad_values_in_one_line(tmp_path: Path, option: str, value: str, message: str) -> None:
    result = CliRunner().invoke(app, ["synth", str(tmp_path), "--size", "tiny", option, value])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "outside").exists()


@pytest.mark.parametrize("anatomy", ["pelvis", "brain"])
@pytest.mark.parametrize("offset", [-2.0, 3.0])
def test_outside_annotator_at_its_bounds_keeps_every_structure(tmp_path: Path, anatomy: str, offset: float) -> None:
    def label_values(root: Path) -> set[int]:
        files = [p for p in (root / "outside").rglob("*.nii.gz") if is_label(p)]
        return set().union(*(np.unique(ras(p)).astype(int).tolist() for p in files))

    own = synthesize(tmp_path / "own", "tiny", seed=4, num_sites=1, anatomy=anatomy)[0].parent
    moved = synthesize(tmp_path / "moved", "tiny", seed=4, num_sites=1, anatomy=anatomy, outside_annotator_mm=offset)
    assert len(label_values(own)) >= 3 and label_values(moved[0].parent) == label_values(own)


@pytest.mark.parametrize("anatomy", ["pelvis", "brain"])
def test_outside_subjects_extend_the_same_outside_scans(tmp_path: Path, anatomy: str) -> None:
    own = synthesize(tmp_path / "own", "tiny", seed=5, num_sites=1, anatomy=anatomy)[0].parent
    options = ["--size", "tiny", "--sites", "1", "--seed", "5", "--anatomy", anatomy, "--outside-subjects", "7"]
    result = CliRunner().invoke(app, ["synth", str(tmp_path / "more"), *options])
    assert result.exit_code == 0, result.output
    more = tmp_path / "more"
    meta = json.loads((more / "outside" / "dataset.json").read_text())
    assert meta["numTraining"] == 7 and json.loads((own / "outside" / "dataset.json").read_text())["numTraining"] == 4
    assert meta["institution"]["subjects"] * 6 == pytest.approx(7)  # relative to the base (6 at `tiny`)
    assert "outside: 7 subjects" in result.output
    for folder in ("site-0", "outside"):  # the sites and the first scans of the outside set are the same files
        files = sorted((own / folder).rglob("*.nii.gz"))
        assert files != []
        for path in files:
            assert np.array_equal(ras(path), ras(more / folder / path.relative_to(own / folder))), path
    assert len([p for p in (more / "outside").rglob("*.nii.gz") if is_label(p)]) == 7


def test_validate_data_cli_exit_code_and_json(tiny: Path) -> None:
    ok = CliRunner().invoke(app, ["validate-data", str(tiny / "site-1")])
    assert ok.exit_code == 0 and "decathlon layout, 4 subjects, 0 errors, 0 warnings" in ok.output
    bad = CliRunner().invoke(app, ["validate-data", str(tiny / "site-1"), "--num-classes", "3", "--json"])
    report = json.loads(bad.output)
    assert bad.exit_code == 1 and not report["ok"] and report["errors"] >= 1
    assert {p["kind"] for p in report["problems"]} == {"label-values", "too-few-subjects"}  # none usable


def test_an_interrupted_synth_leaves_no_staging_folder_and_a_rerun_finishes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedseg.data.synth as synth

    out = tmp_path / "cohort"
    real_render, calls = synth.render_subject, []

    def interrupted(*args: object, **kwargs: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        calls.append(1)
        if len(calls) == 8:  # in the second site (site-0 has 6 subjects at tiny)
            raise KeyboardInterrupt
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synth, "render_subject", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(out, "tiny", seed=5, num_sites=2)
    assert sorted(p.name for p in out.iterdir()) == ["site-0"]  # no hidden half-written folder
    monkeypatch.setattr(synth, "render_subject", real_render)
    finished = {p: p.stat().st_mtime_ns for p in (out / "site-0").rglob("*.nii.gz")}
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = out / f".site-1-{socket.gethostname()}-{dead.stdout.strip()}-x1.partial"  # a killed writer's folder
    (killed / "imagesTr").mkdir(parents=True)
    alive = out / f".site-1-{socket.gethostname()}-{os.getpid()}-x2.partial"  # a live writer's
    alive.mkdir()

    folders = synthesize(out, "tiny", seed=5, num_sites=2)
    assert [f.name for f in folders] == ["site-0", "site-1", "outside"]
    assert not killed.exists() and alive.exists()
    alive.rmdir()
    assert {p: p.stat().st_mtime_ns for p in (out / "site-0").rglob("*.nii.gz")} == finished  # kept, not rewritten
    fresh = synthesize(tmp_path / "fresh", "tiny", seed=5, num_sites=2)
    for name in ("site-0/imagesTr/a_003.nii.gz", "site-1/labelsTr/b_000.nii.gz"):
        assert np.array_equal(ras(out / name), ras(fresh[0].parent / name))
    with pytest.raises(FileExistsError, match="site-0: already exists, written with other settings"):
        synthesize(out, "tiny", seed=6, num_sites=2)
    with pytest.raises(FileExistsError, match="outside: already exists, written with other settings"):
        synthesize(out, "tiny", seed=5, num_sites=2, outside_annotator_mm=0.0)
    (out / "site-1" / "dataset.json").write_text("{")
    with pytest.raises(FileExistsError, match=r"site-1: already exists, without a readable dataset\.json"):
        synthesize(out, "tiny", seed=5, num_sites=2)
    (out / "site-1" / "dataset.json").unlink()
    (out / "site-1").rename(tmp_path / "elsewhere")
    (out / "site-1").symlink_to(tmp_path / "gone")  # a dangling link where a site goes
    with pytest.raises(FileExistsError, match=r"site-1: already exists, without a readable dataset\.json"):
        synthesize(out, "tiny", seed=5, num_sites=2)
    assert [f.name for f in synthesize(out, "tiny", seed=5, num_sites=2, overwrite=True)][1] == "site-1"
    assert not (out / "site-1").is_symlink() and (out / "site-1" / "dataset.json").is_file()
