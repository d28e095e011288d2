"""One model format: every model fedseg writes is predictable with one command and describes itself;
older and foreign files load, or say in one line how to convert them."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config  # noqa: F401 - fixture
from test_predict import _volume
from typer.testing import CliRunner

from fedseg.cli import app as cli
from fedseg.config import RunConfig
from fedseg.model_checkpoint import PREPROCESSING, CheckpointError, ModelCheckpoint
from fedseg.models import build_model
from fedseg.privacy import make_dp_compatible


def _predict(model: Path | str, image: Path, out: Path) -> np.ndarray:
    result = CliRunner().invoke(cli, ["predict", "--model", str(model), str(image), str(out)])
    assert result.exit_code == 0, result.output
    return np.asarray(nib.load(str(out)).dataobj)


@pytest.mark.usefixtures("task_identity")
def test_a_run_folder_its_models_and_its_checkpoint_are_predictable(tmp_path: Path) -> None:
    values = tiny_config(
        tmp_path,
        **{
            "model": "SegResNet",
            "model-args": "init_filters=4, norm=('group', {'num_groups': 2})",
            "num-server-rounds": 1,
            "spacing": "1.5,1.5,1.5",
        },
    )
    run = tmp_path / "run"
    run_federation(InProcessGrid(values, 2), values, run)
    raw = torch.load(run / "model.pt", weights_only=True)
    assert raw["format"] == "fedseg-model/2" and raw["model"] == "SegResNet" and raw["model_source"] == "monai"
    assert raw["model_args"] == {"init_filters": 4, "norm": ("group", {"num_groups": 2})}
    assert raw["pixdim"] == [1.5, 1.5, 1.5] and raw["patch_size"] == [16, 16, 16] and raw["in_channels"] == 1
    assert raw["preprocessing"] == {**PREPROCESSING, "intensity": "z-score per channel over the non-zero voxels"}
    assert raw["intensity"] is None and raw["label_scheme"] == "classes" and raw["fedseg_version"]
    image = _volume(tmp_path)
    final = _predict(run / "model.pt", image, tmp_path / "final.nii.gz")
    assert final.shape == nib.load(str(image)).shape and len(np.unique(final)) >= 1
    # the checkpoint after the last round holds the final weights; a run folder means its model.pt
    np.testing.assert_array_equal(_predict(run / "checkpoint.pt", image, tmp_path / "ckpt.nii.gz"), final)
    np.testing.assert_array_equal(_predict(run, image, tmp_path / "folder.nii.gz"), final)
    _predict(run / "best-model.pt", image, tmp_path / "best.nii.gz")
    from_checkpoint = ModelCheckpoint.load(run / "checkpoint.pt")
    assert (from_checkpoint.model, from_checkpoint.pixdim) == ("SegResNet", (1.5, 1.5, 1.5))
    assert "after round 1" in from_checkpoint.description


def test_format_1_files_still_load(tmp_path: Path) -> None:
    state = build_model("unet", 1, 3).state_dict()
    path = tmp_path / "old.pt"
    torch.save(
        {
            "format": "fedseg-model/1",
            "state_dict": state,
            "model": "unet",
            "in_channels": 1,
            "num_classes": 3,
            "patch_size": [16, 16, 16],
            "pixdim": None,
            "description": "old",
        },
        path,
    )
    model = ModelCheckpoint.load(path)
    assert (model.model, dict(model.model_args), model.model_source) == ("unet", {}, "preset")
    assert all(torch.equal(model.state_dict[k], state[k]) for k in state)


def test_foreign_files_say_how_to_convert_them(tmp_path: Path) -> None:
    state = build_model("unet", 1, 3).state_dict()
    bare, newer = tmp_path / "bare.pt", tmp_path / "newer.pt"
    torch.save(state, bare)
    torch.save({"format": "fedseg-model/9", "state_dict": state}, newer)
    for path, message in [
        (
            bare,
            (
                "bare.pt: weights without their network (a bare state dict): make a fedseg model "
                f"file with `fedseg import-model {bare} --config RUN.toml --out model.pt`"
            ),
        ),
        (newer, "newer.pt: model format 'fedseg-model/9' is newer than this fedseg reads"),
        (tmp_path, f"{tmp_path}: a folder without model.pt or checkpoint.pt"),
    ]:
        with pytest.raises(CheckpointError) as err:
            ModelCheckpoint.load(path)
        assert message in str(err.value) and "\n" not in str(err.value)
    result = CliRunner().invoke(cli, ["predict", "--model", str(bare), str(_volume(tmp_path)), str(tmp_path / "o.nii")])
    assert result.exit_code == 2 and "fedseg import-model" in result.output


def test_import_model_describes_bare_weights_with_a_run_config(tmp_path: Path) -> None:
    torch.manual_seed(5)
    state = build_model("segresnet", 2, 3, {"init_filters": 16}).state_dict()
    bare, config, out = tmp_path / "weights.pt", tmp_path / "run.toml", tmp_path / "model.pt"
    torch.save({"model": state, "epoch": 7}, bare)  # as checkpoint handlers save a network with other objects
    config.write_text(
        'model = "segresnet"\nmodel-args = "init_filters=16"\nin-channels = 2\npatch-size = "24,24,24"\n'
        'spacing = "1.0,1.0,2.0"\n'
    )
    result = CliRunner().invoke(cli, ["import-model", str(bare), "--config", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "segresnet(init_filters=16) [preset], 2 channel(s), 3 classes" in result.output
    model = ModelCheckpoint.load(out)
    assert (model.in_channels, model.patch_size, model.pixdim) == (2, (24, 24, 24), (1.0, 1.0, 2.0))
    assert all(torch.equal(model.state_dict[k], state[k]) for k in state)
    config.write_text('model = "segresnet"\nin-channels = 2\n')  # init_filters 8: the shapes differ
    result = CliRunner().invoke(cli, ["import-model", str(bare), "--config", str(config), "--out", str(out)])
    assert result.exit_code == 2 and "the weights do not fit the run's network (segresnet): " in result.output


def test_a_dp_sgd_model_file_rebuilds_its_dp_compatible_network(tmp_path: Path) -> None:
    args = {"channels": (4, 8), "strides": (2,), "norm": "batch"}
    network = make_dp_compatible(build_model("UNet", 1, 3, args))  # Opacus: BatchNorm → GroupNorm
    config = RunConfig.from_mapping(
        {
            "model": "UNet",
            "model-args": "channels=(4, 8), strides=(2,), norm=batch",
            "dp-sgd": True,
            "dp-noise-multiplier": 1.0,
            "patch-size": 16,
            "in-channels": 1,
        }
    )
    path = tmp_path / "dp.pt"
    ModelCheckpoint.from_config(network.state_dict(), config, "dp run").save(path)
    model = ModelCheckpoint.load(path)
    assert model.dp_compatible and any(isinstance(m, torch.nn.GroupNorm) for m in model.trainer("cpu").model.modules())
    raw = torch.load(path, weights_only=True)
    torch.save({**raw, "dp_compatible": False}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="weights do not fit model UNet"):
        ModelCheckpoint.load(tmp_path / "plain.pt")
