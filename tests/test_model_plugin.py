"""The example network plugin (examples/fedseg-light-unet): installed, listed, checked, trained in a
simulation, and its model file predicted from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import installed_example
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config  # noqa: F401 - fixture
from test_predict import _volume
from typer.testing import CliRunner

from fedseg.cli import app as cli
from fedseg.config import ConfigError, RunConfig
from fedseg.model_checkpoint import CheckpointError, ModelCheckpoint
from fedseg.model_spec import checked_network


@pytest.fixture(scope="module")
def plugin_installed() -> Iterator[None]:
    """The example plugin, pip-installed for this module."""
    with installed_example("fedseg-light-unet"):
        yield


pytestmark = pytest.mark.usefixtures("plugin_installed")


def test_the_plugin_is_listed_and_its_arguments_are_checked() -> None:
    listing = CliRunner().invoke(cli, ["models"]).output
    assert "light-unet (plugin fedseg-light-unet 0.1.0, fedseg_light_unet:LightUNet): 3D U-Net of depthwise" in listing
    config = RunConfig.from_mapping({"model": "light-unet", "model-args": "features=(8, 16, 32)", "patch-size": 16})
    spec, parameters = checked_network(config)
    assert spec.source == "plugin fedseg-light-unet 0.1.0" and dict(spec.args) == {"features": (8, 16, 32)}
    assert parameters == sum(p.numel() for p in spec.build(1, 3).parameters())
    with pytest.raises(ConfigError, match=r"model 'light-unet' takes no argument 'width' \(its arguments: features\)"):
        RunConfig.from_mapping({"model": "light-unet", "model-args": "width=8"})
    with pytest.raises(
        ConfigError,
        match="run-config 'model-args': model 'light-unet' cannot be built with these "
        "arguments: ValueError: features needs at least 2 positive widths",
    ):
        checked_network(RunConfig.from_mapping({"model": "light-unet", "model-args": "features=(8,)"}))


@pytest.mark.usefixtures("task_identity")
def test_a_plugin_network_trains_in_a_simulation_and_predicts(tmp_path: Path) -> None:
    values = tiny_config(
        tmp_path,
        **{"model": "light-unet", "model-args": "features=(8, 16, 32)", "num-server-rounds": 2, "local-epochs": 2},
    )
    arrays, history = run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    assert [r.round for r in history.rounds] == [0, 1, 2] and not any(r.failures for r in history.rounds)
    assert history.rounds[-1].train_loss < history.rounds[1].train_loss  # the sites' plugin network learns
    assert "stem.weight" in arrays.to_torch_state_dict()  # the plugin's own layer names went round
    model = ModelCheckpoint.load(tmp_path / "run" / "model.pt")
    assert (model.model, dict(model.model_args)) == ("light-unet", {"features": (8, 16, 32)})
    assert model.model_source == "plugin fedseg-light-unet 0.1.0"
    out = tmp_path / "out.nii.gz"
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(tmp_path / "run" / "model.pt"), str(_volume(tmp_path)), str(out)]
    )
    assert result.exit_code == 0 and out.is_file(), result.output


def test_a_model_file_of_a_missing_plugin_names_the_package(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(
        {
            "format": "fedseg-model/2",
            "state_dict": {},
            "model": "ghost-net",
            "model_source": "plugin fedseg-ghost-net 1.0",
            "in_channels": 1,
            "num_classes": 3,
            "patch_size": [16, 16, 16],
            "pixdim": None,
        },
        path,
    )
    with pytest.raises(
        CheckpointError,
        match="'ghost-net', which this installation cannot build "
        r"\(the file needs plugin fedseg-ghost-net 1.0: install it\)",
    ):
        ModelCheckpoint.load(path)
