"""Brain-tumour federations: 4 modalities end to end, BraTS labels and regions, channel mismatches."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY_RUN, read_history
from inprocess_grid import InProcessGrid, run_federation, task_identity

from fedseg import messages as m
from fedseg.config import ConfigError, RunConfig
from fedseg.data.datalist import load_datalist
from fedseg.data.synth import synthesize
from fedseg.data.validate import validate_site
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.models import build_model
from fedseg.predict import predict

__all__ = ["task_identity"]  # the fixture

BRATS_RUN = {**TINY_RUN, "synthetic-anatomy": "brain", "label-scheme": "brats", "num-classes": 4}
REGION_METRICS = ("dice-WT", "dice-TC", "dice-ET")


@pytest.fixture(scope="module")
def brain_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny synthetic brain-tumour institutions (4 modalities, BraTS layout) and the outside one."""
    root = tmp_path_factory.mktemp("brain")
    synthesize(root, "tiny", seed=0, num_sites=2, anatomy="brain")
    return root


def _brats_named_site(root: Path, subjects: int = 4) -> Path:
    """A dataset.json site named as BraTS names its files: <id>/<id>_t1.nii.gz … and <id>_seg.nii.gz."""
    rng = np.random.default_rng(0)
    training = []
    for index in range(subjects):
        case = f"BraTS2021_{index:05d}"
        (root / case).mkdir(parents=True)
        images = []
        for modality in ("t1", "t1ce", "t2", "flair"):
            nib.save(
                nib.Nifti1Image(rng.normal(100, 10, (10, 10, 8)).astype(np.float32), np.eye(4)),
                root / case / f"{case}_{modality}.nii.gz",
            )
            images.append(f"./{case}/{case}_{modality}.nii.gz")
        label = np.zeros((10, 10, 8), np.uint8)
        label[3:7, 3:7, 2:6], label[4:6, 4:6, 3:5] = 2, 4
        label[5, 5, 4] = 1
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / case / f"{case}_seg.nii.gz")
        training.append({"image": images, "label": f"./{case}/{case}_seg.nii.gz"})
    labels = {"0": "background", "1": "necrotic core", "2": "edema", "4": "enhancing tumour"}
    (root / "dataset.json").write_text(json.dumps({"labels": labels, "training": training}))
    return root


def test_a_brats_named_site_validates_with_its_subject_ids(tmp_path: Path) -> None:
    site = _brats_named_site(tmp_path / "site")
    report = validate_site(site)
    assert report.errors == [], report.lines()
    assert report.channels == 4
    assert [item["subject"] for item in load_datalist(site)] == [f"BraTS2021_{i:05d}" for i in range(4)]
    # a label value outside the declared BraTS values (0, 1, 2, 4) is still caught
    bad = nib.load(site / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz")
    data = np.asarray(bad.dataobj).copy()
    data[0, 0, 0] = 3
    nib.save(nib.Nifti1Image(data, bad.affine), site / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz")
    [problem] = validate_site(site).errors
    assert problem.kind == "label-values" and "values 3 outside the declared classes 0, 1, 2, 4" in problem.fault


def test_check_config_refuses_patch_sizes_and_channels_the_model_cannot_take() -> None:
    with pytest.raises(
        ConfigError,
        match=r"'patch-size' \(40, 40, 40\): model 'ahnet' needs every side to be a "
        r"multiple of 32",
    ):
        RunConfig.from_mapping({"model": "ahnet", "patch-size": "40"})
    with pytest.raises(ConfigError, match="'in-channels' is 4; model 'ahnet' takes 1 channel"):
        RunConfig.from_mapping({"model": "ahnet", "patch-size": "64", "in-channels": 4})
    with pytest.raises(ConfigError, match="label-scheme 'brats' has 4"):
        RunConfig.from_mapping({"label-scheme": "brats", "num-classes": 3})
    with pytest.raises(ConfigError, match="'region-training' needs label-scheme 'brats'"):
        RunConfig.from_mapping({"region-training": True})


def test_a_site_with_another_channel_count_answers_a_clear_error_and_the_round_goes_on(
    tmp_path: Path, brain_sites: Path, task_identity: None
) -> None:
    # site-1 of this federation holds single-channel pelvic scans; the global model takes 4 channels
    root = tmp_path / "data"
    root.mkdir()
    (root / "site-0").symlink_to(brain_sites / "site-0")
    synthesize(tmp_path / "pelvis", "tiny", seed=0, num_sites=2)
    (root / "site-1").symlink_to(tmp_path / "pelvis" / "site-1")
    values = {
        **BRATS_RUN,
        "data-dir": str(root),
        "output-dir": str(tmp_path / "runs"),
        "num-server-rounds": 1,
        "local-epochs": 1,
    }
    nodes = [
        {"data-dir": str(root / f"site-{k}"), "site-id": k, "state-dir": str(tmp_path / f"state-{k}")} for k in range(2)
    ]
    grid = InProcessGrid(values, 2, node_configs=nodes)
    _, history = run_federation(grid, values, tmp_path / "run")
    assert history.config["in-channels"] == 4  # inferred from data-dir/site-0
    errors = [r for r in grid.replies if r.has_error()]
    assert {r.error.code for r in errors} == {m.CHANNELS_CODE}
    assert len(errors) == 3  # evaluate round 0, train and evaluate round 1
    reason = errors[0].error.reason
    assert "the site's images have 1 channel(s), the global model takes 4 (run-config 'in-channels')" in reason
    assert str(tmp_path) not in reason and "pelvis" not in reason
    last = history.rounds[-1]
    assert set(last.train) == {"site-0"} and set(last.eval) == {"site-0"}
    assert {f["stage"] for f in last.failures} == {"train", "evaluate"}
    assert set(REGION_METRICS) <= set(last.eval["site-0"])


def test_predict_segments_a_four_modality_case_in_the_input_space(tmp_path: Path, brain_sites: Path) -> None:
    torch.manual_seed(0)
    model = build_model("unet", 4, 4)
    checkpoint = tmp_path / "model.pt"
    ModelCheckpoint(
        model.state_dict(), "unet", 4, (16, 16, 16), pixdim=(1.0, 1.0, 1.0), in_channels=4, label_scheme="brats"
    ).save(checkpoint)
    item = load_datalist(brain_sites / "site-1")[0]
    files = [Path(p) for p in item["image"]]
    [out] = predict([checkpoint], files, tmp_path / "seg.nii.gz")
    result, source = nib.load(str(out)), nib.load(str(files[0]))
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    labels = np.asarray(result.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 4} and len(np.unique(labels)) >= 2  # enhancing written as 4
    # the same case as one 4D file (modalities on the last axis) gives the same label map
    stacked = np.stack([np.asarray(nib.load(str(f)).dataobj) for f in files], axis=-1)
    nib.save(nib.Nifti1Image(stacked, source.affine), tmp_path / "case4d.nii.gz")
    [out4d] = predict([checkpoint], tmp_path / "case4d.nii.gz", tmp_path / "seg4d.nii.gz")
    four_d = nib.load(str(out4d))
    assert four_d.shape == source.shape and np.allclose(four_d.affine, source.affine)
    np.testing.assert_array_equal(np.asarray(four_d.dataobj), labels)
    with pytest.raises(ValueError, match="has 2 channel\\(s\\), the model takes 4"):
        predict([checkpoint], files[:2], tmp_path / "two.nii.gz")


@pytest.mark.parametrize("region_training", [True])
def test_flwr_run_trains_a_four_channel_brats_federation(tmp_path: Path, region_training: bool, flwr_run) -> None:
    output = tmp_path / "runs"
    run = {**BRATS_RUN, "num-server-rounds": 3, "region-training": region_training, "output-dir": str(output)}
    result = flwr_run(run, num_supernodes=2)
    assert result.returncode == 0, result.stdout + result.stderr
    history = read_history(output, result)
    assert history["config"]["in-channels"] == 4
    first, last = history["rounds"][0], history["rounds"][-1]
    assert last["failures"] == [] and set(last["eval"]) == {"site-0", "site-1"}
    for site in last["eval"].values():
        assert set(REGION_METRICS) <= set(site)

    def whole_tumour(record: dict) -> float:
        return float(np.mean([site["dice-WT"] for site in record["eval"].values()]))

    assert whole_tumour(last) > whole_tumour(first) + 0.2, (whole_tumour(first), whole_tumour(last))
    assert "final mean Dice per region: WT" in result.stdout + result.stderr
