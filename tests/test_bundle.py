"""A MONAI bundle as the sites' network: made here (configs/train.json, metadata, weights), trained 2
rounds in a simulation from its weights; the model file needs no bundle afterwards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import pytest
import torch
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config  # noqa: F401 - fixture
from test_predict import _volume
from typer.testing import CliRunner

from fedseg.bundle import differences, read_bundle
from fedseg.cli import app as cli
from fedseg.config import ConfigError, RunConfig
from fedseg.initial_model import initial_model
from fedseg.intensity import IntensityWindow
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.model_spec import checked_network, intensity_window
from fedseg.models import build_model
from fedseg.predict import inference_pipeline

NETWORK_ARGS = {"init_filters": 4, "norm": ["group", {"num_groups": 2}]}
WINDOW = IntensityWindow(-57.0, 164.0, 0.0, 1.0, clip=False)  # the bundle's ScaleIntensityRanged


def make_bundle(folder: Path, target: str = "SegResNet") -> dict[str, torch.Tensor]:
    """A small segmentation bundle as MONAI's model zoo lays them out; returns its weights."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    (folder / "configs" / "metadata.json").write_text(json.dumps({"name": "tiny_seg", "version": "0.2.0"}))
    train = {
        "num_classes": 3,
        "filters": 2,
        "network_def": {
            "_target_": target,
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": "@num_classes",
            "init_filters": "$@filters * 2",
            "norm": NETWORK_ARGS["norm"],
        },
        "network": "$@network_def.to('cpu')",
        "train": {
            "preprocessing": {
                "_target_": "Compose",
                "transforms": [
                    {"_target_": "LoadImaged", "keys": ["image", "label"]},
                    {"_target_": "Spacingd", "keys": ["image", "label"], "pixdim": [1.5, 1.5, 1.5]},
                    {
                        "_target_": "ScaleIntensityRanged",
                        "keys": "image",
                        "a_min": -57,
                        "a_max": 164,
                        "b_min": 0,
                        "b_max": 1,
                    },
                    {
                        "_target_": "RandCropByPosNegLabeld",
                        "keys": ["image", "label"],
                        "label_key": "label",
                        "spatial_size": [16, 16, 16],
                    },
                ],
            }
        },
        "postprocessing": {"_target_": "Activationsd", "keys": "pred", "softmax": True},
    }
    (folder / "configs" / "train.json").write_text(json.dumps(train))
    torch.manual_seed(11)
    weights = build_model("SegResNet", 1, 3, NETWORK_ARGS).state_dict()
    torch.save(weights, folder / "models" / "model.pt")
    return weights


def test_the_bundle_network_and_what_of_its_processing_differs(tmp_path: Path) -> None:
    make_bundle(tmp_path / "bundle")
    bundle = read_bundle(tmp_path / "bundle")
    assert (bundle.name, bundle.args, bundle.in_channels, bundle.out_channels) == ("SegResNet", NETWORK_ARGS, 1, 3)
    assert bundle.description == "tiny_seg 0.2.0" and bundle.weights_file == tmp_path / "bundle" / "models" / "model.pt"
    assert differences(bundle, (1.5, 1.5, 1.5), (16, 16, 16)) == [
        "the bundle windows intensities (ScaleIntensityRanged: window [-57, 164] → [0, 1], not clipped); the run "
        "z-scores each channel (run-config 'intensity'; \"bundle\" takes the bundle's)"
    ]
    assert differences(bundle, (1.5, 1.5, 1.5), (16, 16, 16), WINDOW) == []  # intensity = "bundle"
    lines = differences(bundle, (1.0, 1.0, 1.0), (32, 32, 32))
    assert "the bundle resamples to [1.5, 1.5, 1.5] mm; the run uses run-config 'spacing' 1.0,1.0,1.0" in lines
    assert "the bundle crops / infers on [16, 16, 16] voxels; the run uses run-config 'patch-size' 32,32,32" in lines


@pytest.mark.usefixtures("task_identity")
def test_a_bundle_network_trains_two_rounds_from_its_weights(tmp_path: Path) -> None:
    weights = make_bundle(tmp_path / "bundle")
    values = tiny_config(
        tmp_path,
        **{"model": "bundle", "bundle": str(tmp_path / "bundle"), "num-server-rounds": 2, "intensity": "bundle"},
    )
    config = RunConfig.from_mapping(values)
    assert intensity_window(config) == WINDOW
    spec, parameters = checked_network(config)
    assert (spec.name, spec.source, parameters) == (
        "SegResNet",
        "bundle tiny_seg 0.2.0",
        sum(t.numel() for t in build_model("SegResNet", 1, 3, NETWORK_ARGS).parameters()),
    )
    start = initial_model(config)
    assert start.source.endswith("bundle/models/model.pt")
    assert all(torch.equal(start.state_dict[k], weights[k]) for k in weights)  # the bundle's weights, not random ones
    _, history = run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    assert [r.round for r in history.rounds] == [0, 1, 2] and not any(r.failures for r in history.rounds)
    assert history.config["bundle"] == str(tmp_path / "bundle")
    shutil.rmtree(tmp_path / "bundle")  # the model file describes the network itself
    model = ModelCheckpoint.load(tmp_path / "run" / "model.pt")
    assert (model.model, dict(model.model_args), model.model_source) == (
        "SegResNet",
        NETWORK_ARGS,
        "bundle tiny_seg 0.2.0",
    )
    assert any(not torch.equal(model.state_dict[k], weights[k]) for k in weights)  # trained
    assert (
        model.intensity == WINDOW
        and "window [-57, 164]"
        in torch.load(tmp_path / "run" / "model.pt", weights_only=True)["preprocessing"]["intensity"]
    )
    out = tmp_path / "out.nii.gz"
    result = CliRunner().invoke(cli, ["predict", "--model", str(tmp_path / "run"), str(_volume(tmp_path)), str(out)])
    assert result.exit_code == 0 and out.is_file(), result.output


def test_a_bundle_fedseg_cannot_train_fails_before_round_one(tmp_path: Path) -> None:
    make_bundle(tmp_path / "custom", target="scripts.net.MyNet")
    make_bundle(tmp_path / "good")
    for values, message in [
        (
            {"bundle": str(tmp_path / "custom")},
            ("network_def '_target_' 'scripts.net.MyNet' is not a class of monai.networks.nets"),
        ),
        (
            {"bundle": str(tmp_path / "good"), "num-classes": 4},
            ("run-config 'bundle': good's network_def has out_channels=3, the run 4"),
        ),
        ({"bundle": str(tmp_path / "missing")}, "missing: bundle folder not found"),
    ]:
        config = RunConfig.from_mapping({"model": "bundle", "patch-size": 16, **values})
        with pytest.raises(ConfigError) as err:
            checked_network(config)
        assert message in str(err.value) and "\n" not in str(err.value)


def test_import_model_turns_a_bundle_into_a_model_file(tmp_path: Path) -> None:
    weights = make_bundle(tmp_path / "bundle")
    out = tmp_path / "model.pt"
    result = CliRunner().invoke(cli, ["import-model", str(tmp_path / "bundle"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = ModelCheckpoint.load(out)
    assert model.model_source == "bundle tiny_seg 0.2.0" and all(
        torch.equal(model.state_dict[k], weights[k]) for k in weights
    )
    assert (model.pixdim, model.patch_size) == ((1.5, 1.5, 1.5), (16, 16, 16))  # the bundle's grid and crop


def test_an_intensity_window_is_what_training_and_predict_apply(tmp_path: Path) -> None:
    image = _volume(tmp_path)  # values from about -20 to 320
    window = intensity_window(RunConfig.from_mapping({"intensity": "window:0,100"}))
    assert window == IntensityWindow(0.0, 100.0, 0.0, 1.0, clip=True)
    volume = inference_pipeline(None, window)({"image": str(image)})["image"]
    raw = torch.as_tensor(nib.load(str(image)).get_fdata(), dtype=torch.float32)
    expected = raw.clamp(0, 100) / 100  # clip to [0, 100], map onto [0, 1]
    torch.testing.assert_close(torch.as_tensor(volume)[0], expected.flip(0, 1), atol=1e-5, rtol=0)  # LPS → RAS
    with pytest.raises(ConfigError, match="run-config 'intensity': 'window:1': give"):
        RunConfig.from_mapping({"intensity": "window:1"})
