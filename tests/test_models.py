"""Networks by name: presets, MONAI classes with model-args, the check before round 1, init-from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config  # noqa: F401 - fixture

from fedseg.config import ConfigError, RunConfig
from fedseg.initial_model import initial_model
from fedseg.model_args import ModelArgsError, parse_model_args
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.model_spec import checked_network
from fedseg.models import build_model, count_parameters


def test_model_args_are_plain_keyword_values() -> None:
    assert parse_model_args("") == {}
    assert parse_model_args(
        "init_filters=16, dropout_prob=0.1, norm=batch, act=('prelu', {'init': 0.2}), "
        "use_conv_final=False, upsample_mode=None"
    ) == {
        "init_filters": 16,
        "dropout_prob": 0.1,
        "norm": "batch",
        "act": ("prelu", {"init": 0.2}),
        "use_conv_final": False,
        "upsample_mode": None,
    }
    for text, fault in [
        ("16", "name=value"),
        ("a=1, a=2", "twice"),
        ("a=open('x')", "not a plain value"),
        ("a=", "not a list of name=value"),
    ]:
        with pytest.raises(ModelArgsError, match=fault):
            parse_model_args(text)


def test_a_monai_network_by_name_with_arguments() -> None:
    config = RunConfig.from_mapping(
        {
            "model": "SegResNet",
            "model-args": "init_filters=4, norm=('group', {'num_groups': 4})",
            "patch-size": "16,16,16",
            "num-classes": 3,
            "in-channels": 2,
        }
    )
    spec, parameters = checked_network(config)
    args = {"init_filters": 4, "norm": ("group", {"num_groups": 4})}
    model = build_model("SegResNet", 2, 3, args)
    assert (spec.name, dict(spec.args), spec.source) == ("SegResNet", args, "monai")
    assert parameters == count_parameters(model) == sum(p.numel() for p in model.parameters())
    assert model.convInit.conv.in_channels == 2 and model.conv_final[-1].conv.out_channels == 3
    with torch.no_grad():
        assert model(torch.zeros(1, 2, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_preset_arguments_can_be_overridden() -> None:
    wide = build_model("unet", 1, 3, {"channels": (8, 16, 32, 64)})
    assert count_parameters(wide) < count_parameters(build_model("unet", 1, 3))
    assert wide.model[0].conv.unit0.conv.out_channels == 8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"model": "resnet"}, "run-config 'model' is 'resnet'; choose one of: unet, segresnet, dynunet, ahnet"),
        (
            {"model": "segresnet", "model-args": "init_filter=16"},
            "run-config 'model-args': model 'segresnet' takes no argument 'init_filter' (its arguments: init_filters,",
        ),
        ({"model": "UNet"}, "run-config 'model-args': model 'UNet': missing a required argument: 'channels'"),
        (
            {"model": "UNet", "model-args": "out_channels=2"},
            "'out_channels' is set by fedseg: give run-config 'num-classes'",
        ),
        ({"model": "SegResNet", "model-args": "init_filters 16"}, "run-config 'model-args': 'init_filters 16' is not"),
        ({"bundle": "somewhere"}, "run-config 'bundle' and model = \"bundle\" go together"),
    ],
)
def test_a_bad_network_fails_with_one_line_naming_the_key(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"model": "DenseNet121"},
            (
                "run-config 'model': model 'DenseNet121' maps a batch of shape (2, 1, 32, 32, 32) "
                "to (2, 3), fedseg needs (2, 3, 32, 32, 32)"
            ),
        ),
        (
            {"model": "SegResNetDS", "model-args": "dsdepth=2"},
            "run-config 'model-args': model 'SegResNetDS' returns list in training, fedseg needs one tensor of logits",
        ),
        (
            {"model": "UNet", "model-args": "channels=(4, 8, 16, 32), strides=(2, 2, 2)", "patch-size": "20,20,20"},
            "run-config 'model-args': model 'UNet' fails on a batch of 2 patches of 20x20x20 voxels: RuntimeError: ",
        ),
    ],
)
def test_the_network_is_run_on_a_dummy_batch_before_round_one(values: dict, message: str) -> None:
    config = RunConfig.from_mapping({"patch-size": "32,32,32", **values, "in-channels": 1})
    with pytest.raises(ConfigError) as err:
        checked_network(config)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.usefixtures("task_identity")
def test_init_from_starts_the_run_from_a_model_file(tmp_path: Path) -> None:
    values = tiny_config(tmp_path, **{"num-server-rounds": 1, "min-sites": 2})
    trained, history = run_federation(InProcessGrid(values, 2), values, tmp_path / "first")
    model_file = tmp_path / "first" / "model.pt"
    config = RunConfig.from_mapping({**values, "init-from": str(model_file)})
    start = initial_model(config)
    assert start.source == str(model_file.resolve()) and len(start.sha256) == 64
    for key, tensor in trained.to_torch_state_dict().items():
        torch.testing.assert_close(start.state_dict[key], tensor)
    # a run folder means its model.pt; the second run starts where the first ended
    second_values = {**values, "init-from": str(tmp_path / "first")}
    _, second = run_federation(InProcessGrid(second_values, 2), second_values, tmp_path / "second")
    assert second.rounds[0].mean_dice == pytest.approx(history.rounds[-1].mean_dice, abs=1e-6)
    assert second.config["init-from"] == str(tmp_path / "first")
    assert ModelCheckpoint.load(tmp_path / "second" / "model.pt").init_from == str(tmp_path / "first")


def test_init_from_weights_that_do_not_fit_fail_before_round_one(tmp_path: Path) -> None:
    other = tmp_path / "segresnet.pt"
    ModelCheckpoint(build_model("segresnet", 1, 3).state_dict(), "segresnet", 3, (16, 16, 16)).save(other)
    for source, message in [
        (other, "the weights do not fit the run's network (unet): "),
        (tmp_path / "missing.pt", "missing.pt not found"),
    ]:
        config = RunConfig.from_mapping({"init-from": str(source), "patch-size": "16,16,16"})
        with pytest.raises(ConfigError, match="run-config 'init-from'") as err:
            initial_model(config)
        assert message in str(err.value)
