"""Hostile input against every command: no traceback, one `error:` line naming the file or key, a
non-zero exit, nothing written half-way, bounded memory for header bombs, and no false rejection.

Table-driven cases for each class of bad input (issue 15), plus property-based fuzzing (hypothesis)
of NIfTI headers, dataset.json manifests, run configs, experiment specs and error-reply redaction.
Commands run in-process through typer's CliRunner; the header-bomb memory checks run `fedseg` in a
subprocess and read its peak RSS. FEDSEG_FUZZ_EXAMPLES=500 fuzzes deeper than CI's 30 examples per property.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import os
import pickle
import re
import stat
import subprocess
import sys
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.config import ConfigError, RunConfig
from fedseg.data.datalist import ALLOW_OUTSIDE_FILE, SiteDataError, scan_site
from fedseg.data.nifti_guard import DEFAULT_MAX_VOXELS, VolumeError, inspect_nifti
from fedseg.data.splits import load_or_make_split
from fedseg.experiments.spec import EXPERIMENT_KEYS, ExperimentSpec
from fedseg.model_checkpoint import CheckpointError, ModelCheckpoint
from fedseg.models import build_model

FUZZ = settings(
    max_examples=int(os.environ.get("FEDSEG_FUZZ_EXAMPLES", "30")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SHAPE = (16, 16, 16)


# ---------------------------------------------------------------------------------------------- helpers
def cli(*args: object) -> tuple[int, str]:
    """Run `fedseg ARGS` in-process: (exit code, stdout + stderr); an escaped exception fails the test."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"fedseg {' '.join(map(str, args))} raised {result.exception!r}\n{result.output}")
    return result.exit_code, result.output


def refused(code: int, output: str, *names: object) -> None:
    """A refusal: non-zero exit, no traceback, not the boundary's 'a fedseg bug' line, names the file or key."""
    assert code != 0, output
    assert "Traceback" not in output and "unexpected" not in output, output
    assert any(str(name) in output for name in names), f"none of {names} in: {output}"


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), str(path))
    return path


def volume(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 10, shape).astype(np.float32)


def segmentation(value: int = 1) -> np.ndarray:
    out = np.zeros(SHAPE, np.uint8)
    out[4:12, 4:12, 4:12] = value
    return out


def folder_site(root: Path, subjects: int = 3) -> Path:
    """A valid images/ + labels/ site."""
    for i in range(subjects):
        save(root / "images" / f"case{i}.nii.gz", volume(i))
        save(root / "labels" / f"case{i}.nii.gz", segmentation())
    return root


def header_bomb(path: Path, shape: tuple[int, ...] = (1024, 1024, 1024), dtype: type = np.float32) -> Path:
    """A tiny .nii.gz whose header claims `shape` voxels and holds none of them."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_qform(np.eye(4), 1)
    header.set_sform(np.eye(4), 1)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4))
    return path


def raw_nifti(path: Path, data: np.ndarray, **fields: object) -> Path:
    """`data` as a .nii.gz whose header fields are set directly (values nibabel's setters refuse)."""
    header = nib.Nifti1Image(data, np.eye(4)).header
    header["vox_offset"] = 352
    for key, value in fields.items():
        header[key] = value
    path.write_bytes(gzip.compress(header.binaryblock + b"\0" * 4 + data.tobytes()))
    return path


def checkpoint(path: Path, **fields: object) -> Path:
    """A tiny unet model file (1 channel, 3 classes); `fields` replace its entries (`...`: removed)."""
    torch.manual_seed(0)
    model = build_model("unet", 1, 3)
    ModelCheckpoint(model.state_dict(), "unet", 3, (16, 16, 16), pixdim=None).save(path)
    if fields:
        data = torch.load(path, weights_only=True)
        data.update(fields)
        torch.save({k: v for k, v in data.items() if v is not ...}, path)
    return path


def validate_traced(site: Path) -> tuple[int, str, int]:
    """`fedseg validate-data SITE` in-process: (exit code, output, peak bytes Python and numpy allocated)."""
    tracemalloc.start()
    try:
        code, output = cli("validate-data", site)
        return code, output, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


# ---------------------------------------------------------------------------------------------- 1. no false rejection
def test_a_brats_named_dataset_json_site_validates(tmp_path: Path) -> None:
    training = []
    for case in ("BraTS2021_00000", "BraTS2021_00001", "BraTS2021_00002"):
        images = [f"./{case}/{case}_{m}.nii.gz" for m in ("t1", "t1ce", "t2", "flair")]
        for i, image in enumerate(images):
            save(tmp_path / image, volume(i))
        label = segmentation(4)
        label[5:7, 5:7, 5:7] = 2
        save(tmp_path / case / f"{case}_seg.nii.gz", label)
        training.append({"image": images, "label": f"./{case}/{case}_seg.nii.gz"})
    labels = {"0": "background", "1": "necrotic", "2": "edema", "4": "enhancing"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels, "training": training}))
    code, output = cli("validate-data", tmp_path)
    assert code == 0 and "0 errors" in output, output


# ---------------------------------------------------------------------------------------------- 2. header bombs
@pytest.mark.parametrize(
    ("shape", "dtype", "kind"),
    [
        ((1024, 1024, 1024), np.float32, "decompression bomb"),
        ((2**15 - 1,) * 3, np.float64, "decompression bomb"),
        ((64, 64, 64, 4), np.int16, "decompression bomb"),
    ],
)
def test_header_bomb_is_refused_from_its_size_before_reading(
    tmp_path: Path, shape: tuple, dtype: type, kind: str
) -> None:
    site = folder_site(tmp_path / "site")
    bomb = header_bomb(site / "images" / "case1.nii.gz", shape, dtype)
    code, output, peak = validate_traced(site)
    refused(code, output, bomb)
    assert "[unreadable]" in output and kind in output, output
    assert peak < 64 * 2**20, f"validate-data allocated {peak / 2**20:.0f} MiB for a {bomb.stat().st_size}-byte file"


def test_a_volume_over_the_sites_voxel_limit_is_refused_but_allowed_when_raised(tmp_path: Path) -> None:
    site = folder_site(tmp_path / "site")
    code, output = cli("validate-data", site, "--max-voxels", 1000)
    refused(code, output, "case0.nii.gz")
    assert "[too-large]" in output and "4,096 voxels per channel exceeds this site's limit of 1,000" in output
    code, output = cli("validate-data", site, "--max-voxels", 4096)
    assert code == 0, output
    code, output = cli("validate-data", site, "--max-voxels", 0)
    refused(code, output, "max-voxels")
    with pytest.raises(VolumeError, match=r"resampled from 1,1,1 mm to 0.1,0.1,0.1 mm"):
        inspect_nifti(site / "images" / "case0.nii.gz", pixdim=(0.1, 0.1, 0.1), max_voxels=10**6)


def test_the_site_datasets_check_headers_before_monai_loads_them(tmp_path: Path) -> None:
    from fedseg.data.datasets import evaluation_dataset

    bomb = header_bomb(tmp_path / "bomb.nii.gz")
    item = {"image": str(bomb), "label": str(save(tmp_path / "l.nii.gz", segmentation())), "subject": "x"}
    with pytest.raises(SiteDataError, match="decompression bomb") as caught:
        evaluation_dataset([item], None)
    assert caught.value.public == "site data invalid: 1 x unreadable"


PEAK_RSS = """
import resource, subprocess, sys
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.stderr.write(done.stdout + done.stderr)
"""


def peak_rss(*args: object) -> tuple[int, int, str]:
    """(exit code, peak RSS in MiB, output) of `fedseg ARGS` in a fresh process."""
    command = [sys.executable, "-c", PEAK_RSS, sys.executable, "-m", "fedseg.cli", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    code, kib = map(int, done.stdout.split())
    return code, kib // 1024, done.stderr


def test_header_bomb_memory_of_validate_data_and_predict_in_a_subprocess(tmp_path: Path) -> None:
    site = folder_site(tmp_path / "site")
    model = checkpoint(tmp_path / "model.pt")
    _, baseline, _ = peak_rss("validate-data", site)
    bomb = header_bomb(site / "images" / "case2.nii.gz")
    code, validate_peak, output = peak_rss("validate-data", site)
    refused(code, output, bomb)
    code, predict_peak, output = peak_rss("predict", bomb, tmp_path / "out.nii.gz", "--model", model)
    refused(code, output, bomb)
    assert not (tmp_path / "out.nii.gz").exists()
    # before: 1.4 GB (validate-data) and 5.7 GB (predict) for this 4 GiB claim
    assert validate_peak < baseline + 64, (baseline, validate_peak)
    assert predict_peak < baseline + 400, (baseline, predict_peak)  # + the model and torch's inference setup


# ---------------------------------------------------------------------------------------------- 3 + 5. validate-data
def _rgb(path: Path) -> None:
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), str(path))


def _complex_nan(path: Path) -> None:
    data = volume().astype(np.complex64)
    data[1, 1, 1] = complex(np.nan, 0)
    save(path, data)


BAD_IMAGES: dict[str, tuple[Callable[[Path], object], str]] = {
    "rgb": (_rgb, "[voxel-type]"),
    "complex-with-nan": (_complex_nan, "[voxel-type]"),
    "2d": (lambda p: save(p, volume()[:, :, 0]), "[dimensions]"),
    "5d": (lambda p: save(p, volume(shape=(4, 4, 4, 1, 2))), "[dimensions]"),
    "empty-axis": (lambda p: save(p, np.zeros((4, 0, 4), np.float32)), "[dimensions]"),
    "singular-affine": (
        lambda p: raw_nifti(p, volume(), qform_code=0, sform_code=1, srow_y=[0, 0, 0, 0]),
        "[affine-invalid]",
    ),
    "nan-affine": (
        lambda p: raw_nifti(p, volume(), qform_code=0, sform_code=1, srow_y=[0, np.nan, 0, 0]),
        "[affine-invalid]",
    ),
    "random-bytes": (lambda p: p.write_bytes(os.urandom(500)), "[unreadable]"),
    "gzip-of-text": (lambda p: p.write_bytes(gzip.compress(b"hello " * 100)), "[unreadable]"),
    "truncated": (lambda p: p.write_bytes(gzip.compress(b"\0" * 100)), "[unreadable]"),
    "empty-file": (lambda p: p.write_bytes(b""), "[unreadable]"),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_image_is_reported_with_its_file(tmp_path: Path, case: str) -> None:
    site = folder_site(tmp_path / "site")
    path = site / "images" / "case1.nii.gz"
    make, kind = BAD_IMAGES[case]
    make(path)
    code, output = cli("validate-data", site)
    refused(code, output, path)
    assert kind in output, output


@pytest.mark.parametrize(
    ("values", "options", "message"),
    [
        ([-1], [], "label values -1: labels are class numbers 0 to 255"),
        ([1000], [], "label values 1000"),
        ([3], ["--num-classes", "3"], "outside the declared classes 0..2"),
    ],
)
def test_label_values_are_checked_without_a_class_count(
    tmp_path: Path, values: list[int], options: list, message: str
) -> None:
    site = folder_site(tmp_path / "site")
    label = segmentation().astype(np.int16)
    label[0, 0, 0] = values[0]
    save(site / "labels" / "case2.nii.gz", label)
    code, output = cli("validate-data", site, *options)
    refused(code, output, site / "labels" / "case2.nii.gz")
    assert message in output, output


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--tolerance", "nan"),
        ("--tolerance", "inf"),
        ("--tolerance", "-1"),
        ("--num-classes", "0"),
        ("--num-classes", "1"),
        ("--num-classes", "100000"),
        ("--channels", "0"),
        ("--channels", "-3"),
        ("--channels", "1000"),
    ],
)
def test_nonsensical_options_are_refused(tmp_path: Path, option: str, value: str) -> None:
    code, output = cli("validate-data", folder_site(tmp_path / "site"), option, value)
    refused(code, output, f"error: {option}:")
    assert code == 2


MANIFESTS = {
    "not-json": b"{training: [",
    "not-utf8": b'{"training": ["\xff\xfe"]}',
    "a-list": b"[1, 2, 3]",
    "training-a-string": b'{"training": "all"}',
    "entry-an-int": b'{"training": [1]}',
    "entry-a-list": b'{"training": [["a.nii.gz", "b.nii.gz"]]}',
    "image-an-int": b'{"training": [{"image": 5, "label": "l.nii.gz"}]}',
    "image-list-of-mixed": b'{"training": [{"image": ["a.nii.gz", 3], "label": "l.nii.gz"}]}',
    "label-a-dict": b'{"training": [{"image": "a.nii.gz", "label": {"x": 1}}]}',
    "id-a-number": b'{"training": [{"image": "a.nii.gz", "label": "l.nii.gz", "id": 7}]}',
    "nul-in-path": b'{"training": [{"image": "a\\u0000.nii.gz", "label": "l.nii.gz"}]}',
    "deep-nesting": b'{"training": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "labels-a-list": b'{"labels": [0, 1], "training": [{"image": "a.nii.gz", "label": "l.nii.gz"}]}',
}


@pytest.mark.parametrize("case", sorted(MANIFESTS))
def test_malformed_manifest_is_reported_with_the_manifest(tmp_path: Path, case: str) -> None:
    (tmp_path / "dataset.json").write_bytes(MANIFESTS[case])
    code, output = cli("validate-data", tmp_path)
    refused(code, output, tmp_path / "dataset.json", tmp_path / "a.nii.gz")


def test_a_manifest_or_cases_file_too_large_is_refused_from_its_size(tmp_path: Path) -> None:
    """A sparse 1 GiB file: read whole, it would take gigabytes before any parser said no."""
    with (tmp_path / "dataset.json").open("wb") as handle:
        handle.truncate(2**30)
    code, output = cli("validate-data", tmp_path)
    refused(code, output, tmp_path / "dataset.json")
    assert "larger than the 64 MiB a dataset.json may have" in output
    (tmp_path / "results").mkdir()
    with (tmp_path / "results" / "cases.csv").open("wb") as handle:
        handle.truncate(2**30)
    code, output = cli("report", tmp_path / "results")
    refused(code, output, tmp_path / "results" / "cases.csv")
    assert "larger than the 256 MiB a cases file may have" in output


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["case0.nii.gz", "./images/case1.nii.gz", "../x.nii.gz", "/etc/passwd", ""]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["image", "label", "id", "subject", "training", "labels"]) | st.text(max_size=4),
            children,
            max_size=4,
        )
    ),
    max_leaves=12,
)


@FUZZ
@given(manifest=st.dictionaries(st.sampled_from(["training", "labels", "name"]), JSON, max_size=3))
def test_fuzzed_manifests_never_crash(tmp_path_factory: pytest.TempPathFactory, manifest: dict) -> None:
    site = tmp_path_factory.mktemp("fuzz-manifest")
    save(site / "images" / "case0.nii.gz", volume())
    save(site / "images" / "case1.nii.gz", volume(1))
    (site / "dataset.json").write_text(json.dumps(manifest))
    code, output = cli("validate-data", site)
    refused(code, output, site)


def test_manifest_paths_and_links_leaving_the_site_are_refused_unless_allowed(tmp_path: Path) -> None:
    outside = save(tmp_path / "elsewhere" / "secret.nii.gz", volume())
    other = save(tmp_path / "elsewhere" / "other.nii.gz", volume())
    site = folder_site(tmp_path / "site")
    (site / "images" / "case1.nii.gz").unlink()
    (site / "images" / "case1.nii.gz").symlink_to(outside)
    code, output = cli("validate-data", site)
    refused(code, output, site / "images" / "case1.nii.gz")
    assert "[outside-site]" in output
    assert cli("validate-data", site, "--allow-outside-data")[0] == 0
    (site / ALLOW_OUTSIDE_FILE).touch()  # the site operator's statement
    assert cli("validate-data", site)[0] == 0

    manifest_site = tmp_path / "msd"
    for i in range(3):
        save(manifest_site / "imagesTr" / f"c{i}.nii.gz", volume(i))
        save(manifest_site / "labelsTr" / f"c{i}.nii.gz", segmentation())
    training = [{"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"} for i in range(3)]
    training[0]["image"] = "../elsewhere/secret.nii.gz"
    training[1]["image"] = str(other)
    (manifest_site / "dataset.json").write_text(json.dumps({"training": training}))
    listing = scan_site(manifest_site)
    assert [p.kind for p in listing.errors].count("outside-site") == 2, listing.errors
    assert not scan_site(manifest_site, allow_outside=True).errors


@pytest.mark.parametrize(
    ("split", "fault"),
    [
        ({"train": ["case0"], "val": [], "test": ["case1", "case2"]}, "'val' is empty"),
        ({"train": ["case0", "case1"], "val": ["case2"], "test": []}, "'test' is empty"),
        ({"train": ["case0", "case1"], "val": ["case2"], "test": ["case1"]}, "named more than once"),
        ({"train": ["case0", 1], "val": ["case2"], "test": ["case1"]}, "must be a list of subject ids"),
        ({"train": "case0", "val": ["case2"], "test": ["case1"]}, "must be a list of subject ids"),
        ([1, 2], "unreadable split file"),
    ],
)
def test_bad_split_files_are_refused(tmp_path: Path, split: object, fault: str) -> None:
    items = [{"subject": f"case{i}", "image": "x", "label": "y"} for i in range(3)]
    (tmp_path / "split-seed0.json").write_text(json.dumps(split))
    with pytest.raises(SiteDataError, match=fault) as caught:
        load_or_make_split(items, 0, tmp_path)
    assert str(tmp_path / "split-seed0.json") in str(caught.value)
    assert str(tmp_path) not in caught.value.public


HEADER_FIELDS = {
    "dim": st.lists(st.integers(-2, 2**15 - 1), min_size=8, max_size=8),
    "datatype": st.sampled_from(
        [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, -1, 12345]
    ),
    "pixdim": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=8, max_size=8),
    "vox_offset": st.floats(-1e9, 1e9, width=32) | st.just(float("nan")),
    "scl_slope": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "qform_code": st.integers(-5, 5),
    "sform_code": st.integers(-5, 5),
    "quatern_b": st.floats(allow_nan=True, allow_infinity=True, width=32),
    "srow_x": st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=4, max_size=4),
}


@FUZZ
@given(fields=st.fixed_dictionaries({}, optional=HEADER_FIELDS), compress=st.booleans(), keep=st.integers(0, 20_000))
def test_fuzzed_nifti_headers_never_crash_nor_blow_up(
    tmp_path_factory: pytest.TempPathFactory, fields: dict, compress: bool, keep: int
) -> None:
    image = nib.Nifti1Image(volume(), np.eye(4))
    header = image.header
    for key, value in fields.items():
        with contextlib.suppress(ValueError, OverflowError, TypeError):
            header[key] = value
    raw = (header.binaryblock + b"\0" * 4 + volume().tobytes())[: 352 + keep]
    site = folder_site(tmp_path_factory.mktemp("fuzz-header"))
    path = site / "images" / ("case1.nii.gz" if compress else "case1.nii")
    (site / "images" / "case1.nii.gz").unlink()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    code, output, peak = validate_traced(site)
    assert "Traceback" not in output and "unexpected" not in output, output
    assert code in (0, 1), output
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB for a {path.stat().st_size}-byte file"
    if code:
        assert str(path) in output or "too-few" in output, output


# ---------------------------------------------------------------------------------------------- 4. check-config
FLOAT_KEYS = [
    "learning-rate",
    "weight-decay",
    "momentum",
    "lr-final-ratio",
    "round-timeout",
    "dp-noise-multiplier",
    "dp-max-grad-norm",
    "dp-target-epsilon",
    "dp-delta",
    "augmentation-invert",
]


def write_toml(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_floats_are_refused_naming_the_key(tmp_path: Path, key: str, value: str) -> None:
    assert key in RunConfig().to_dict(), f"no run-config key {key}"
    code, output = cli("check-config", write_toml(tmp_path / "run.toml", f"{key} = {value}\n"))
    refused(code, output, f"'{key}'")
    assert code == 2


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("seed = -1", "'seed'"),
        ("seed = 99999999999999999", "'seed'"),
        ("num-server-rounds = 1000000000", "'num-server-rounds'"),
        ("local-epochs = 1e300", "'local-epochs'"),
        ("batch-size = 100000", "'batch-size'"),
        ("num-classes = 100000", "'num-classes'"),
        ("synthetic-size = 100000", "'synthetic-size'"),
        ('patch-size = "4096"\nsynthetic-size = 200', "'patch-size'"),
        ("min-sites = 2\nmin-live-sites = 3", "'min-live-sites'"),
        ('output-dir = "../../elsewhere"', "'output-dir'"),
        ('output-dir = "runs/../../x"', "'output-dir'"),
        ('output-dir = ""', "'output-dir'"),
        ('data-dir = "a\\u0000b"', "'data-dir'"),
        ("seed = [1, 2]", "'seed'"),
        ('learning-rate = "fast"', "'learning-rate'"),
        ("fedprox.proximal-mu = nan", "'fedprox.proximal-mu'"),
        ("spacing = nan", "'spacing'"),
        ('spacing = "1,nan,1"', "'spacing'"),
        ("round-timeout = 1e300", "'round-timeout'"),
        ('strategy = ":x"', "'strategy'"),
        ('strategy = "..:x"', "'strategy'"),
    ],
)
def test_values_a_run_would_die_on_are_refused_before_round_one(tmp_path: Path, text: str, key: str) -> None:
    path = write_toml(tmp_path / "run.toml", text + "\n")
    code, output = cli("check-config", path)
    refused(code, output, key)
    assert code == 2 and output.count("error:") == 1, output


@pytest.mark.parametrize("raw", [b"seed = 1\n\xff\xfe = 2\n", b"\x00\x01\x02", b"a = [" * 5000, b"[[[["])
def test_unreadable_toml_names_the_file(tmp_path: Path, raw: bytes) -> None:
    path = write_toml(tmp_path / "run.toml", raw)
    code, output = cli("check-config", path)
    refused(code, output, path)
    code, output = cli("site", "check", "--data-dir", tmp_path, "--config", path)
    refused(code, output, path)


def test_keys_of_a_strategy_not_selected_get_a_warning_and_pyproject_defaults_stay_valid(tmp_path: Path) -> None:
    code, output = cli("check-config", write_toml(tmp_path / "run.toml", "fedprox.proximal-mu = 0.5\n"))
    assert code == 0 and "warning:" in output and "'fedprox.proximal-mu'" in output, output
    code, output = cli(
        "check-config", write_toml(tmp_path / "run.toml", 'strategy = "fedprox"\nfedprox.proximal-mu = 0.5\n')
    )
    assert code == 0 and "warning:" not in output, output
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    import tomllib

    from fedseg.config import flatten
    from strategies.registry import build_strategy

    build_strategy(
        RunConfig.from_mapping(flatten(tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]))
    )


RUN_KEYS = sorted(RunConfig().to_dict())
VALUES = (
    st.integers(-(2**70), 2**70)
    | st.floats()
    | st.booleans()
    | st.text(max_size=12)
    | st.lists(st.integers(-5, 100), max_size=3)
    | st.sampled_from(["", "nan", "0", "8,8,8", "../x", "fedprox", ":x", ".:x", "flower:", "os:sep"])
)


@FUZZ
@given(
    values=st.dictionaries(
        st.sampled_from([*RUN_KEYS, "fedprox.proximal-mu", "nope.key", "unknown"]), VALUES, max_size=4
    )
)
def test_fuzzed_run_configs_raise_only_config_errors(values: dict) -> None:
    from strategies.registry import build_strategy

    try:
        config = RunConfig.from_mapping(values)
        build_strategy(config)
    except ConfigError as err:
        assert str(err).startswith("run-config") or "'" in str(err), err
        return
    for value in config.to_dict().values():
        if isinstance(value, float):
            assert math.isfinite(value)
    assert config.seed >= 0 and config.min_live_sites <= config.min_sites


# ---------------------------------------------------------------------------------------------- 3. experiment specs
EXPERIMENT = '[experiment]\nname = "x"\ndata-dir = "data"\nsites = 2\n'


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('sites = "3"', "'sites'"),
        ("sites = 2.5", "'sites'"),
        ("sites = true", "'sites'"),
        ("sites = 100000", "'sites'"),
        ("arms = 5", "'arms'"),
        ("arms = [1, 2]", "'arms'"),
        ('strategies = "fedavg"', "'strategies'"),
        ("name = 5", "'name'"),
        ('name = ".."', "'name'"),
        ('name = ""', "'name'"),
        ('name = "a\\\\b"', "'name'"),
        ('output-dir = "../up"', "'output-dir'"),
        ('outside = "../x"', "'outside'"),
        ('ensemble-folds = "x"', "'ensemble-folds'"),
        ("finetune-rounds = -1", "'finetune-rounds'"),
        ("overlay-cases = 1e9", "'overlay-cases'"),
        ("dp-sgd-noise-multipliers = [nan]", "'dp-sgd-noise-multipliers'"),
        ('outside = "site-1"', "'outside' 'site-1' is site-1, a site the experiment trains on"),
        ('strategies = ["fedavg", "fedprox", "fedavg"]', "'strategies' names 'fedavg' more than once"),
        ('arms = ["private", "private"]', "'arms' names 'private' more than once"),
        ("ensemble-folds = 3", "'ensemble-folds' = 3 ensembles nothing without 'ensemble-arms'"),
    ],
)
def test_wrongly_typed_experiment_values_are_refused_naming_the_key(tmp_path: Path, line: str, key: str) -> None:
    text = EXPERIMENT.replace(f"{line.split(' =')[0]} = ", "#") + line + "\n"
    path = write_toml(tmp_path / "exp.toml", text)
    for command in ("check-config", "experiment"):
        code, output = cli(command, path)
        refused(code, output, key)
        assert str(path) in output, output


def test_an_outside_folder_linked_to_a_training_site_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data" / "site-0").mkdir(parents=True)
    (tmp_path / "data" / "elsewhere").symlink_to(tmp_path / "data" / "site-0")
    text = EXPERIMENT.replace('data-dir = "data"', f'data-dir = "{tmp_path / "data"}"') + 'outside = "elsewhere"\n'
    path = write_toml(tmp_path / "exp.toml", text)
    code, output = cli("check-config", path)
    refused(code, output, "'outside' 'elsewhere' is site-0, a site the experiment trains on")


@pytest.mark.parametrize(
    "text",
    [
        "experiment = 5\n",
        "[experiment]\nname='x'\ndata-dir='d'\nsites=2\n[run]\n",
        'run = "x"\n[experiment]\nname="x"\ndata-dir="d"\nsites=2\n',
    ],
)
def test_experiment_tables_of_the_wrong_type_are_refused(tmp_path: Path, text: str) -> None:
    path = write_toml(tmp_path / "exp.toml", text)
    code, output = cli("check-config", path)
    if code == 0:  # an empty [run] table is fine
        assert "valid" in output
        return
    refused(code, output, path)


@FUZZ
@given(
    values=st.dictionaries(
        st.sampled_from(sorted(EXPERIMENT_KEYS)),
        VALUES,
        max_size=4,
    )
)
def test_fuzzed_experiment_specs_raise_only_config_errors(values: dict) -> None:
    experiment = {"name": "x", "data-dir": "data", "sites": 2, **values}
    with contextlib.suppress(ConfigError):
        ExperimentSpec.from_mapping({"experiment": experiment})


# ---------------------------------------------------------------------------------------------- 3 + 6. predict
@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("model") / "model.pt")


def _pickle(path: Path) -> None:
    path.write_bytes(pickle.dumps({"format": "fedseg-model/1", "state_dict": Path("/etc/passwd")}))


class _RunsCode:
    """Unpickled without weights_only, this would run a command that leaves a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


BAD_MODELS: dict[str, Callable[[Path], object]] = {
    "code-in-a-pickle": lambda p: p.write_bytes(pickle.dumps(_RunsCode(p.with_name("ran")))),
    "random-bytes": lambda p: p.write_bytes(os.urandom(4096)),
    "empty": lambda p: p.write_bytes(b""),
    "a-pickle": _pickle,
    "a-zip-of-nothing": lambda p: torch.save([1, 2, 3], p),
    "missing-keys": lambda p: checkpoint(p, state_dict=...),
    "mismatched-shapes": lambda p: torch.save({**torch.load(checkpoint(p), weights_only=True), "num_classes": 4}, p),
    "wrong-type": lambda p: checkpoint(p, num_classes="three"),
    "unknown-model": lambda p: checkpoint(p, model="resnet"),
    "nan-weights": lambda p: torch.save(
        {
            **(d := torch.load(checkpoint(p), weights_only=True)),
            "state_dict": {
                k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in d["state_dict"].items()
            },
        },
        p,
    ),
    "a-folder": lambda p: p.mkdir(),
}


@pytest.mark.parametrize("case", sorted(BAD_MODELS))
def test_a_model_file_that_is_not_a_fedseg_model_is_refused(tmp_path: Path, case: str) -> None:
    bad = tmp_path / "bad.pt"
    BAD_MODELS[case](bad)
    image = save(tmp_path / "in.nii.gz", volume())
    code, output = cli("predict", image, tmp_path / "out.nii.gz", "--model", bad)
    refused(code, output, bad)
    assert files_under(tmp_path) == {bad, image, *files_under(bad)}  # nothing written: nor the marker file
    assert "weights_only" not in output and "Warning" not in output and len(output.strip().splitlines()) == 1
    if case in ("code-in-a-pickle", "a-pickle"):
        assert "not a weights file: it asks to build Python objects" in output


@FUZZ
@given(
    key=st.sampled_from(["personal_weight", "ensemble_weight"]),
    weight=VALUES | st.lists(st.floats() | st.integers(-2, 2) | st.booleans() | st.text(max_size=2), max_size=5),
)
def test_fuzzed_ensemble_weights_load_in_range_or_are_refused_naming_the_key(
    model_path: Path, key: str, weight: object
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.pt"
        torch.save({**torch.load(model_path, weights_only=True), key: weight}, path)
        try:
            loaded = getattr(ModelCheckpoint.load(path), key.replace("-", "_"))
        except CheckpointError as err:
            assert str(err).startswith(f"{path}: ") and f"'{key}'" in str(err) and "\n" not in str(err)
            return
        assert loaded is None or (len(loaded) in (1, 3) and all(0.0 <= w <= 1.0 for w in loaded))


BAD_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "not-nifti-name": (lambda d: save(d / "in.nii.gz", volume()).rename(d / "in.png") or d / "in.png", "not a NIfTI"),
    "text-as-nifti": (lambda d: write_toml(d / "in.nii.gz", "hello"), "cannot read"),
    "2d": (lambda d: save(d / "in.nii.gz", volume()[:, :, 0]), "3D or 4D"),
    "one-nan-voxel": (
        lambda d: save(
            d / "in.nii.gz", np.where(np.arange(16**3).reshape(SHAPE) == 100, np.nan, volume()).astype(np.float32)
        ),
        "NaN, infinite or out-of-range",
    ),
    "one-inf-voxel": (
        lambda d: save(
            d / "in.nii.gz", np.where(np.arange(16**3).reshape(SHAPE) == 7, np.inf, volume()).astype(np.float32)
        ),
        "NaN, infinite or out-of-range",
    ),
    "header-bomb": (lambda d: header_bomb(d / "in.nii.gz"), "decompression bomb"),
    "complex": (lambda d: save(d / "in.nii.gz", volume().astype(np.complex64)), "complex"),
    "two-channels": (lambda d: save(d / "in.nii.gz", volume(shape=(*SHAPE, 2))), "channel"),
    "singular-affine": (
        lambda d: raw_nifti(d / "in.nii.gz", volume(), qform_code=0, sform_code=1, srow_x=[0, 0, 0, 0]),
        "singular",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_a_bad_input_to_predict_is_refused_and_nothing_is_written(tmp_path: Path, model_path: Path, case: str) -> None:
    make, fault = BAD_INPUTS[case]
    image = make(tmp_path)
    before = files_under(tmp_path)
    code, output = cli("predict", image, tmp_path / "out" / "seg.nii.gz", "--model", model_path)
    refused(code, output, image)
    assert fault in output, output
    assert files_under(tmp_path) == before


def test_unwritable_or_odd_outputs_are_refused_and_a_folder_is_all_or_nothing(tmp_path: Path, model_path: Path) -> None:
    image = save(tmp_path / "in.nii.gz", volume())
    blocker = write_toml(tmp_path / "file.txt", "x")
    for out in (blocker / "seg.nii.gz", tmp_path / "seg.png", image, Path("/proc/seg.nii.gz"), tmp_path):
        before = files_under(tmp_path)
        code, output = cli("predict", image, out, "--model", model_path)
        refused(code, output, out)
        assert files_under(tmp_path) == before
    cases = tmp_path / "cases"
    save(cases / "a.nii.gz", volume(1))
    save(cases / "b.nii.gz", np.where(np.arange(16**3).reshape(SHAPE) == 5, np.nan, volume(2)).astype(np.float32))
    code, output = cli("predict", cases, tmp_path / "labels", "--model", model_path)
    refused(code, output, cases / "b.nii.gz")
    assert not (tmp_path / "labels").exists(), "a.nii.gz must not be written when b.nii.gz fails"
    code, output = cli("predict", image, tmp_path / "ok.nii.gz", "--model", model_path)
    assert code == 0 and (tmp_path / "ok.nii.gz").is_file(), output


# ---------------------------------------------------------------------------------------------- 3. site check
def test_site_check_reports_a_dry_run_failing_inside_monai(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = folder_site(tmp_path / "site")
    config = write_toml(tmp_path / "run.toml", 'patch-size = "8,8,8"\nspacing = "0.01"\nnum-classes = 2\n')
    code, output = cli("site", "check", "--data-dir", site, "--config", config)
    refused(code, output, site)
    assert "[dry-run]" in output and "resampled from 1,1,1 mm to 0.01,0.01,0.01 mm" in output, output

    from fedseg.trainer import SegmentationTrainer

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("applying transform <monai.transforms.Spacingd>")

    monkeypatch.setattr(SegmentationTrainer, "predict_logits", broken)
    config = write_toml(tmp_path / "run.toml", 'patch-size = "8,8,8"\nspacing = ""\nnum-classes = 2\n')
    code, output = cli("site", "check", "--data-dir", site, "--config", config)
    refused(code, output, site)
    assert "[dry-run]" in output and "RuntimeError: applying transform" in output, output


def test_site_check_reports_a_header_bomb_and_a_missing_folder(tmp_path: Path) -> None:
    site = folder_site(tmp_path / "site")
    header_bomb(site / "labels" / "case0.nii.gz")
    code, output = cli("site", "check", "--data-dir", site)
    refused(code, output, site / "labels" / "case0.nii.gz")
    code, output = cli("site", "check", "--data-dir", tmp_path / "nowhere")
    refused(code, output, tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- 7. certs
def test_certs_refuse_a_planted_link_and_write_nothing(tmp_path: Path) -> None:
    out, victim = tmp_path / "certs", tmp_path / "victim.txt"
    victim.write_text("do not touch")
    (out / "sites" / "b").mkdir(parents=True)
    (out / "sites" / "b" / "auth.key").symlink_to(victim)
    code, output = cli("certs", out, "--host", "localhost", "--site", "a", "--site", "b")
    refused(code, output, out / "sites" / "b" / "auth.key")
    assert victim.read_text() == "do not touch"
    assert not (out / "ca.key").exists() and not (out / "sites" / "a").exists()
    code, output = cli("certs", out, "--host", "localhost", "--site", "a", "--site", "b", "--force")
    refused(code, output, out / "sites" / "b" / "auth.key")  # a link is refused even with --force
    (out / "sites" / "b" / "auth.key").unlink()
    (out / "sites").rename(tmp_path / "real-sites")
    (out / "sites").symlink_to(tmp_path / "real-sites")
    code, output = cli("certs", out, "--host", "localhost", "--site", "a")
    refused(code, output, out / "sites")


def test_certs_never_replace_keys_without_force_and_use_safe_modes(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    old_umask = os.umask(0)
    try:
        code, output = cli("certs", out, "--host", "localhost", "--site", "a")
    finally:
        os.umask(old_umask)
    assert code == 0, output
    for folder in (out, out / "sites", out / "sites" / "a"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    for key in (out / "ca.key", out / "server.key", out / "sites" / "a" / "auth.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    ca = (out / "ca.key").read_bytes()
    code, output = cli("certs", out, "--host", "localhost", "--site", "a")
    refused(code, output, out / "ca.crt")
    assert "--force" in output and (out / "ca.key").read_bytes() == ca
    code, output = cli("certs", out, "--host", "localhost", "--site", "a", "--force")
    assert code == 0 and (out / "ca.key").read_bytes() != ca, output
    assert stat.S_IMODE((out / "ca.key").stat().st_mode) == 0o600
    assert not [p for p in out.rglob(".*.tmp")]


@pytest.mark.parametrize("host", ["", "a b", "-bad.example", "bad..example", "exämple.org", "x" * 300, "a/b"])
def test_certs_refuse_bad_host_names(tmp_path: Path, host: str) -> None:
    code, output = cli("certs", tmp_path / "c", "--host", host, "--site", "a")
    refused(code, output, "host")
    assert not (tmp_path / "c").exists()


# ---------------------------------------------------------------------------------------------- 8. redaction
SECRETS = [
    "/data/ward 7/patient 0042 scan.nii.gz",
    "patient_0042",
    "Müller Anna",
    "C:\\scans\\jane doe.nii",
    "BraTS2021_00017",
    "site-secret-42",
]


def _errors(secret: str) -> list[Exception]:
    from clients.site_runtime import ChannelMismatch

    return [
        RuntimeError(f"cannot read {secret}"),
        KeyError(secret),
        OSError(2, "No such file", secret),
        ValueError(f"subject {secret}: label values 7"),
        FileNotFoundError(secret),
        Exception(secret),
        SiteDataError(f"{secret}: broken", "site data invalid: 1 x unreadable"),
        ChannelMismatch(1, 4),
        MemoryError(secret),
        torch.OutOfMemoryError(secret),
        VolumeError("too-large", secret, f"{secret} big"),
    ]


@pytest.mark.parametrize("secret", SECRETS)
def test_error_replies_carry_no_path_file_name_or_subject_id(secret: str) -> None:
    from flwr.app import Message, RecordDict

    from clients.client_app import _error_reply
    from fedseg import messages as m
    from fedseg.experiments.local_grid import server_identity

    words = [w for w in secret.replace("\\", "/").replace("/", " ").split() if len(w) > 2 and w not in ("data",)]
    with server_identity():
        request = Message(RecordDict(), dst_node_id=1, message_type="train")
        for err in _errors(secret):
            reply = _error_reply(request, "train", err)
            reason = reply.error.reason
            assert all(word not in reason for word in [secret, *words]), (err, reason)
            assert reason.startswith("train failed at this site: ") and reason.endswith("(details in the site's log)")
            assert reply.error.code in (m.SITE_ERROR_CODE, m.CHANNELS_CODE, m.OUT_OF_MEMORY_CODE)


@FUZZ
@given(
    secret=st.text(st.characters(blacklist_categories=("Cs",)), min_size=6, max_size=40).filter(
        lambda s: s.strip() == s and any(c.isalnum() for c in s)
    )
)
def test_fuzzed_error_messages_never_leave_the_site(secret: str) -> None:
    from clients.client_app import public_reason

    for err in _errors(secret):
        if isinstance(err, SiteDataError):
            continue  # their public text is built from kinds and counts, not from the message
        assert secret not in public_reason(err)


@FUZZ
@given(value=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_fuzzed_report_pair_is_a_report_or_one_error_line(value: str) -> None:
    from fedseg.report.cases import CaseRow, write_cases

    with tempfile.TemporaryDirectory() as tmp:
        sides = []
        for name, arm in (("ours", "fedavgm"), ("theirs", "fedavg"), ("odd", "fed\navgm")):
            (Path(tmp) / name).mkdir()
            rows = [
                CaseRow(arm, "federated", "federation", "site-0", False, s, (d,)) for s, d in (("a", 0.5), ("b", 0.7))
            ]
            write_cases(Path(tmp) / name / "cases.csv", rows)
            sides.append(Path(tmp) / name)
        code, output = cli("report", sides[0], "--against", sides[1], "--out", Path(tmp) / "vs", "--pair", value)
        if code == 0:
            assert value.partition("=")[0].strip() == "fedavgm" and value.partition("=")[2].strip() == "fedavg"
        else:
            lines = output.strip().splitlines()
            assert code == 2 and len(lines) == 1 and lines[0].startswith("error: --pair"), output
            assert "Traceback" not in output
        # an arm name with a line break in a hostile cases.csv: refused on one line naming the file
        code, output = cli("report", sides[2], "--against", sides[1], "--out", Path(tmp) / "odd-vs", "--pair", value)
        lines = output.strip().splitlines()
        assert code != 0 and len(lines) == 1 and "Traceback" not in output, output
        assert lines[0].startswith("error: --pair") or f"{sides[2] / 'cases.csv'}, line 2" in lines[0], output


# ---------------------------------------------------------------------------------------------- every command
@pytest.mark.parametrize(
    "args",
    [
        ["report", "/nonexistent/results"],
        ["synth", "/proc/fedseg-synth", "--size", "tiny"],
        ["synth", "out", "--size", "huge"],
        ["server", "--certs", "/nonexistent", "--print"],
        ["experiment", "/nonexistent.toml"],
        ["check-config", "/nonexistent.toml"],
        ["validate-data", "/nonexistent"],
        ["predict", "a.nii.gz", "--model", "m.pt"],
        ["certs", "/proc/fedseg-certs", "--host", "localhost", "--site", "a"],
    ],
)
def test_every_command_refuses_bad_arguments_without_a_traceback(
    tmp_path: Path, args: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, output = cli(*args)
    refused(code, output, *[a for a in args[1:] if a.startswith(("/", "a.", "huge"))] or ["error:"])


def test_an_unexpected_failure_is_one_line_not_a_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import fedseg.data.validate as validate

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(validate, "validate_site", broken)
    code, output = cli("validate-data", tmp_path)
    assert code == 1 and "Traceback" not in output
    assert output.strip().splitlines()[-1].startswith("error: unexpected ZeroDivisionError: boom")


def test_default_voxel_limit_is_512_cubed() -> None:
    assert DEFAULT_MAX_VOXELS == 512**3


# ------------------------------------------------------------ a site's kept optimizer state, tampered with
STATE_TENSORS = st.builds(
    lambda shape, kind, scale: {
        "zeros": torch.zeros(shape),
        "ones": torch.full(shape, scale),
        "nan": torch.full(shape, float("nan")),
        "negative": torch.full(shape, -abs(scale) - 1.0),
        "int": torch.ones(shape, dtype=torch.int64),
        "bool": torch.ones(shape, dtype=torch.bool),
        "half": torch.ones(shape, dtype=torch.float16),
    }[kind],
    st.sampled_from([(), (1,), (2,), (2, 3), (3, 2), (4,)]),
    st.sampled_from(["zeros", "ones", "nan", "negative", "int", "bool", "half"]),
    st.floats(-1e38, 1e38),
)


@FUZZ
@given(
    name=st.sampled_from(["adam", "adamw", "sgd"]),
    entries=st.dictionaries(
        st.builds(
            "{}.{}".format,
            st.sampled_from(["weight", "bias", "other", "", "0"]),
            st.sampled_from(["step", "exp_avg", "exp_avg_sq", "momentum_buffer", ""]),
        ),
        STATE_TENSORS,
        max_size=6,
    ),
    garble=st.none() | st.binary(max_size=64),
)
def test_tampered_optimizer_state_fails_with_one_line_or_trains(
    tmp_path_factory: pytest.TempPathFactory, name: str, entries: dict, garble: bytes | None
) -> None:
    """Whatever a site's kept optimizer state file holds, the site's next fit either continues from it
    or stops with one line naming the file (clients.personal / fedseg.optim), nothing else."""
    from clients.personal import OPTIMIZER, PersonalState, PersonalStateError
    from fedseg.optim import (
        OptimizerStateError,
        load_optimizer_moments,
        one_step_state,
        optimizer_factory,
        optimizer_moments,
    )

    model = torch.nn.Linear(3, 2)
    names = [n for n, _ in model.named_parameters()]
    trained = optimizer_factory(name)(model.parameters(), 0.01)
    model(torch.ones(1, 3)).sum().backward()
    trained.step()
    state = PersonalState(tmp_path_factory.mktemp("site-state"), "run")
    state.save(OPTIMIZER, {**optimizer_moments(trained, names), **entries}, 1)  # a real state, entries replaced
    if garble is not None:  # bytes overwritten somewhere in the file
        raw = bytearray(state.path(OPTIMIZER).read_bytes())
        at = len(garble) % max(len(raw), 1)
        raw[at : at + len(garble)] = garble
        state.path(OPTIMIZER).write_bytes(bytes(raw))
    optimizer = optimizer_factory(name)(model.parameters(), 0.01)
    try:
        moments = state.load(OPTIMIZER, 2) or {}
        load_optimizer_moments(optimizer, names, moments, one_step_state(optimizer_factory(name)))
    except PersonalStateError as err:
        assert str(state.path(OPTIMIZER)) in str(err) and "\n" not in str(err)
        return
    except OptimizerStateError as err:
        assert "\n" not in str(err) and str(err)
        return
    model.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()  # an accepted state trains


@FUZZ
@given(
    kind=st.sampled_from(["fedper-head", "fedbn-norms"]),
    entries=st.dictionaries(
        st.sampled_from(
            ["model.2.1.conv.unit0.conv.bias", "model.2.0.adn.N.weight", "model.0.conv.unit0.adn.N.bias", "x"]
        ),
        STATE_TENSORS,
        max_size=3,
    ),
    drop=st.booleans(),
    poison=st.sampled_from([None, float("nan"), float("inf")]),
    garble=st.none() | st.binary(max_size=64),
)
def test_tampered_personal_layers_fail_with_one_line_or_load(
    tmp_path_factory: pytest.TempPathFactory,
    kind: str,
    entries: dict,
    drop: bool,
    poison: float | None,
    garble: bytes | None,
) -> None:
    """Whatever a site's kept output stage (FedPer) or normalisation layers (FedBN) file holds, the site
    either loads layers that fit its model, finite, or stops with one line naming the file."""
    from clients.personal import PersonalState, PersonalStateError
    from fedseg.models import build_model, head_state_keys, norm_state_keys

    model = build_model("unet", 1, 3)
    keys = head_state_keys(model, 3) if kind == "fedper-head" else norm_state_keys(model)
    own = {k: v for k, v in model.state_dict().items() if k in keys}
    kept = {**own, **entries}
    if poison is not None:  # a real layer of the right shape, one value non-finite
        first = sorted(own)[0]
        kept[first] = own[first].clone().flatten().index_fill(0, torch.tensor([0]), poison).reshape(own[first].shape)
    if drop:
        kept.pop(sorted(kept)[0])
    state = PersonalState(tmp_path_factory.mktemp("site-state"), "run")
    state.save(kind, kept, 1)
    if garble is not None:
        raw = bytearray(state.path(kind).read_bytes())
        at = len(garble) % max(len(raw), 1)
        raw[at : at + len(garble)] = garble
        state.path(kind).write_bytes(bytes(raw))
    try:
        layers = state.load_layers(kind, 2, own)
    except PersonalStateError as err:
        assert str(state.path(kind)) in str(err) and "\n" not in str(err)
        return
    assert layers is not None and set(layers) == set(own)
    model.load_state_dict({**model.state_dict(), **layers})  # fits the model
    assert all(bool(torch.isfinite(v).all()) for v in layers.values())


@pytest.mark.parametrize(
    ("history", "fault"),
    [
        ("{", "not a readable JSON record"),
        ("[]", "not a JSON object"),
        ('{"run-key": ["x"]}', "'run-key' must be a string of printable characters"),
        ('{"run-key": "a\\nb"}', "'run-key' must be a string of printable characters"),
    ],
)
def test_a_hostile_history_names_the_file_when_its_run_key_is_read(tmp_path: Path, history: str, fault: str) -> None:
    from fedseg.federation import run_key

    (tmp_path / "history.json").write_text(history)
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(tmp_path / 'history.json'))}: {re.escape(fault)}"):
        run_key(tmp_path)
