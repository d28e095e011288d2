"""Hostile model files, network sizes, run histories and synth options: one `error:` line naming the file,
key or option, before anything is built, tested or written; never an overflow, a blank label map or
gigabytes allocated for a few bytes of input."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_hostile_input import checkpoint, cli, peak_rss, refused, save, volume

from fedseg import network_check
from fedseg.config import UPPER_BOUNDS, ConfigError, RunConfig
from fedseg.data import synth
from fedseg.experiments.evaluation import ExperimentError, arm_privacy
from fedseg.limits import MAX_PARAMETERS, MAX_SPACING_MM
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.model_spec import checked_network
from fedseg.models import count_parameters, network_shapes
from fedseg.report.cases import CLIENT_LEVEL, SAMPLE_LEVEL


def predict_with(tmp_path: Path, **fields: object) -> tuple[Path, int, str]:
    """`fedseg predict` of a small volume with the unet model file whose `fields` are replaced."""
    bad = checkpoint(tmp_path / "bad.pt", **fields)
    code, output = cli("predict", save(tmp_path / "in.nii.gz", volume()), tmp_path / "out.nii.gz", "--model", bad)
    return bad, code, output


def one_line_refusal(tmp_path: Path, code: int, output: str, bad: Path, *names: str) -> None:
    """Refused in one line naming the file and each of `names`; no label map written."""
    refused(code, output, bad)
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert all(name in output for name in names), output
    assert not (tmp_path / "out.nii.gz").exists()


# ---------------------------------------------------------------------------------------------- 1. overflow
@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("pixdim", [10**400, 1, 1]),
        ("patch_size", [float("inf"), 16, 16]),
        ("patch_size", [16.5, 16, 16]),
        ("intensity", [10**400, 10**401, 0, 1, True]),
    ],
)
def test_overflowing_or_infinite_model_fields_are_refused_naming_the_field(
    tmp_path: Path, key: str, value: object
) -> None:
    bad, code, output = predict_with(tmp_path, **{key: value})
    one_line_refusal(tmp_path, code, output, bad, f"'{key}'", "finite")


# ---------------------------------------------------------------------------------------------- 2. model_args
def test_model_args_that_do_not_build_are_one_line_naming_the_file(tmp_path: Path) -> None:
    bad, code, output = predict_with(tmp_path, model_args={"channels": "abc"})
    one_line_refusal(tmp_path, code, output, bad, "'model_args'", "channels='abc'")
    assert "Warning" not in output


def test_a_network_that_does_not_build_is_a_known_error_of_every_command(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pt"
    torch.save(torch.load(checkpoint(tmp_path / "model.pt"), weights_only=True)["state_dict"], weights)
    config = tmp_path / "run.toml"
    config.write_text('model = "unet"\nmodel-args = "channels=abc"\nnum-classes = 3\nin-channels = 1\n')
    code, output = cli("import-model", weights, "--config", config, "--out", tmp_path / "out.pt")
    assert code == 2 and "unexpected" not in output, output
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: run-config 'model-args': model 'unet' cannot be built"), output
    assert not (tmp_path / "out.pt").exists()


def test_a_tiny_model_file_naming_a_huge_network_is_compared_without_building_it(tmp_path: Path) -> None:
    bad = checkpoint(tmp_path / "bad.pt", state_dict={}, model_args={"channels": (16, 32, 64, 5000)})
    assert bad.stat().st_size < 4096
    image = save(tmp_path / "in.nii.gz", volume())
    code, peak, output = peak_rss("predict", image, tmp_path / "out.nii.gz", "--model", bad)
    assert code == 2 and output.strip().splitlines() == [
        f"error: {bad}: weights do not fit model unet(channels=(16, 32, 64, 5000)) with 1 input channel(s), "
        "3 classes: 75 missing and 0 unexpected weight(s), e.g. ['model.0.conv.unit0.adn.A.weight', "
        "'model.0.conv.unit0.adn.N.bias']"
    ], output
    assert peak < 1536, peak  # before: 3.1 GB, the network built on the CPU to read its parameter shapes


def test_network_shapes_are_on_the_meta_device_also_for_networks_that_need_real_numbers() -> None:
    # SwinUNETR calls .item() while it is built: no meta-device build, its parameters moved there instead
    for name, args in (("unet", {"channels": (16, 32, 64, 5000)}), ("SwinUNETR", {"feature_size": 480})):
        network = network_shapes(name, 1, 3, args)
        assert {t.device.type for t in network.state_dict().values()} == {"meta"}, name
    assert count_parameters(network) == 6_196_205_733  # 25 GB of float32, counted without allocating them


# ---------------------------------------------------------------------------------------------- 3. blank output
@pytest.mark.parametrize(
    "window",
    [
        [-math.inf, math.inf, 0.0, 1.0, True],
        [0.0, 1.0, math.nan, math.nan, True],
        [-1e308, 1e308, 0.0, 1.0, True],  # a span beyond floating point
        [0.0, 1.0, 0.5, 0.5, True],  # every voxel mapped to 0.5
    ],
)
def test_intensity_windows_that_blank_the_image_are_refused(tmp_path: Path, window: list) -> None:
    bad, code, output = predict_with(tmp_path, intensity=window)
    one_line_refusal(tmp_path, code, output, bad, "'intensity'")


def test_pixdim_beyond_any_scanner_is_refused_and_clinical_spacings_load(tmp_path: Path) -> None:
    bad, code, output = predict_with(tmp_path, pixdim=[1e30] * 3)
    one_line_refusal(tmp_path, code, output, bad, "'pixdim'", f"{MAX_SPACING_MM:g} mm")
    for pixdim in ([0.1, 0.1, 0.1], [0.5, 0.5, 5.0], [MAX_SPACING_MM] * 3):
        assert ModelCheckpoint.load(checkpoint(tmp_path / "ok.pt", pixdim=pixdim)).pixdim == tuple(pixdim)


@pytest.mark.parametrize(
    ("replace", "fault"),
    [
        (lambda w: w.to_sparse(), "is not a dense CPU tensor (torch.sparse_coo, device cpu)"),
        (lambda w: torch.empty(w.shape, device="meta"), "is not a dense CPU tensor (torch.strided, device meta)"),
        (lambda w: w.double() * 1e300, "holds values beyond the range of the network's torch.float32"),
    ],
)
def test_weights_that_are_not_dense_float32_values_are_refused(tmp_path: Path, replace: object, fault: str) -> None:
    # a sparse or meta tensor broke the checks themselves; float64 weights past float32 became inf (background)
    state = torch.load(checkpoint(tmp_path / "good.pt"), weights_only=True)["state_dict"]
    key = "model.0.conv.unit0.conv.weight"
    bad, code, output = predict_with(tmp_path, state_dict={**state, key: replace(state[key])})  # type: ignore[operator]
    one_line_refusal(tmp_path, code, output, bad, f"'{key}' {fault}")


def test_a_truncated_or_overflowing_input_is_refused_naming_it(tmp_path: Path) -> None:
    model = checkpoint(tmp_path / "model.pt")
    good = save(tmp_path / "in.nii.gz", volume()).read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(good[: len(good) // 2])
    code, output = cli("predict", tmp_path / "cut.nii.gz", tmp_path / "out.nii.gz", "--model", model)
    one_line_refusal(tmp_path, code, output, tmp_path / "cut.nii.gz", "cannot segment: EOFError")
    # finite voxels whose z-score overflows float32: before, an all-background label map and exit 0
    huge = save(tmp_path / "huge.nii.gz", volume() * 1e35)
    code, output = cli("predict", huge, tmp_path / "out.nii.gz", "--model", model)
    one_line_refusal(tmp_path, code, output, huge, "4096 NaN, infinite or out-of-range (|value| > 1e+12) voxel(s)")


# ---------------------------------------------------------------------------------------------- 4. check-config
@pytest.mark.parametrize(
    ("config", "count"),
    [
        ('model = "segresnet"\nmodel-args = "init_filters=2048"\n', "76,957,581,315"),
        # SwinUNETR is not built on the meta device: before, the check built its 25 GB on the CPU
        ('model = "SwinUNETR"\nmodel-args = "feature_size=480"\npatch-size = "32"\n', "6,196,205,733"),
    ],
)
def test_check_config_refuses_a_network_over_the_parameter_limit(tmp_path: Path, config: str, count: str) -> None:
    path = tmp_path / "run.toml"
    path.write_text(config)
    code, output = cli("check-config", path)
    refused(code, output, path)
    assert len(output.strip().splitlines()) == 1 and "run-config 'model-args'" in output, output
    assert f"{count} parameters" in output and f"{MAX_PARAMETERS:,}" in output, output


NEEDS_NUMBERS = """
import torch
from torch import nn


class NeedsNumbers(nn.Module):
    def __init__(self, in_channels, out_channels, width=4):
        super().__init__()
        self.conv, self.head = nn.Conv3d(in_channels, width, 3, padding=1), nn.Conv3d(width, out_channels, 1)

    def forward(self, x):
        scale = float(x.abs().amax().item()) + 1.0  # .item(): no meta tensors, the check needs real numbers
        return self.head(self.conv(x / scale))
"""


@pytest.fixture
def needs_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A network plugin that cannot run on the meta device, importable here and in child processes."""
    root = tmp_path / "plugin"
    (root / "needs_numbers-0.1.dist-info").mkdir(parents=True)
    (root / "needs_numbers.py").write_text(NEEDS_NUMBERS)
    (root / "needs_numbers-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: needs-numbers\nVersion: 0.1\n"
    )
    (root / "needs_numbers-0.1.dist-info" / "entry_points.txt").write_text(
        "[fedseg.models]\nneeds-numbers = needs_numbers:NeedsNumbers\n"
    )
    monkeypatch.syspath_prepend(str(root))
    return "needs-numbers"


def test_a_network_checked_on_the_cpu_is_refused_past_its_memory_budget(
    needs_numbers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(network_check, "cpu_check_budget", lambda: 2**30)
    config = {"model": needs_numbers, "model-args": "width=64", "patch-size": 256, "synthetic-size": 256}
    with pytest.raises(ConfigError) as refusal:  # 2 x 64 x 256³ float32 activations: 8 GiB, over the 1 GiB cap
        checked_network(RunConfig.from_mapping(config))
    message = str(refusal.value)
    assert message.startswith("run-config 'model-args': model 'needs-numbers' needs more than 1.0 GiB"), message
    assert "2 patches of 256x256x256 voxels on the CPU: choose a smaller run-config 'patch-size'" in message
    assert len(message.splitlines()) == 1
    spec, count = checked_network(RunConfig.from_mapping({**config, "patch-size": 16}))  # the same network fits
    assert count == sum(p.numel() for p in spec.build(1, 3).parameters()) == 1 * 64 * 27 + 64 + 64 * 3 + 3


def test_predict_refuses_a_model_patch_past_its_memory_and_fits_windows_to_what_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fedseg.predict as predict_module

    monkeypatch.setattr(predict_module, "cpu_check_budget", lambda: 4 * 2**30)
    bad, code, output = predict_with(tmp_path, patch_size=[512, 512, 512])  # one pass: ~18 GiB
    one_line_refusal(tmp_path, code, output, bad, "one 512x512x512 patch with model 'unet' would need about")
    assert "more than the 4.0 GiB fedseg may use (50% of this machine's memory)" in output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # on a GPU: its free memory is the budget
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * 2**30, 80 * 2**30))
    bad, code, output = predict_with(tmp_path, patch_size=[512, 512, 512])
    one_line_refusal(tmp_path, code, output, bad, "more than the 3.0 GiB fedseg may use (free on the GPU)")
    monkeypatch.undo()
    monkeypatch.setattr(predict_module, "cpu_check_budget", lambda: 4 * 2**30)

    one_patch = network_check.inference_patch_bytes("unet", {}, 1, 3, (16, 16, 16))
    assert network_check.inference_patch_bytes("unet", {}, 1, 3, (64, 64, 64)) == 64 * one_patch  # by voxels
    image, model = save(tmp_path / "in.nii.gz", volume(shape=(40, 36, 30))), checkpoint(tmp_path / "model.pt")
    real_trainer, seen = ModelCheckpoint.trainer, []

    def spy(self: ModelCheckpoint, device: torch.device, sw_batch_size: int = 4) -> object:
        seen.append(sw_batch_size)
        return real_trainer(self, device, sw_batch_size)

    monkeypatch.setattr(predict_module.ModelCheckpoint, "trainer", spy)
    outputs = {}
    for windows in (4, 1):  # a budget for four windows per pass, then for one
        monkeypatch.setattr(predict_module, "cpu_check_budget", lambda w=windows: w * one_patch + one_patch // 2)
        code, output = cli("predict", image, tmp_path / f"out{windows}.nii.gz", "--model", model)
        assert code == 0 and seen[-1] == windows, output
        outputs[windows] = np.asarray(nib.load(tmp_path / f"out{windows}.nii.gz").dataobj)
    assert np.array_equal(outputs[4], outputs[1])


def test_check_config_still_counts_an_ordinary_network(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('model = "unet"\n')
    code, output = cli("check-config", path)
    assert code == 0 and "network: unet [preset], 1,188,924 parameters" in output, output


def test_import_model_refuses_a_network_over_the_parameter_limit_before_building_it(tmp_path: Path) -> None:
    path, weights = tmp_path / "run.toml", tmp_path / "weights.pt"
    path.write_text('model = "segresnet"\nmodel-args = "init_filters=2048"\n')
    torch.save({}, weights)
    code, output = cli("import-model", weights, "--config", path, "--out", tmp_path / "model.pt")
    assert code == 2 and len(output.strip().splitlines()) == 1, output
    assert "76,957,581,315 parameters" in output and not (tmp_path / "model.pt").exists(), output


def test_a_run_spacing_beyond_what_a_model_file_may_hold_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('spacing = "1,1,150"\n')
    code, output = cli("check-config", path)
    refused(code, output, path)
    assert f"'spacing' must be > 0 and <= {MAX_SPACING_MM:g} mm per axis" in output, output


def test_a_bundle_window_past_float_range_is_not_a_window() -> None:
    from fedseg.bundle import _window

    assert _window({"a_min": 10**400, "a_max": 10**401}) is None
    window = _window({"a_min": -100, "a_max": 300})
    assert window is not None and (window.a_min, window.a_max) == (-100.0, 300.0)


# ---------------------------------------------------------------------------------------------- 5. run histories
def history(tmp_path: Path, text: str) -> Path:
    (tmp_path / "history.json").write_text(text)
    return tmp_path / "history.json"


@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ('{"rounds": [{"strategy": {"epsilon": 1' + "0" * 400 + ', "delta": 1e-5}}]}', "too large"),
        ('{"rounds": [{"strategy": {"epsilon": NaN, "delta": -3}}]}', "ε = nan is not a finite number >= 0"),
        ('{"rounds": [{"strategy": {"epsilon": Infinity, "delta": 1e-5}}]}', "ε = inf"),
        ('{"rounds": [{"strategy": {"epsilon": 1.0, "delta": -3}}]}', "δ = -3.0 is not a number in [0, 1)"),
        ('{"rounds": [{"train": {"site-0": {"dp-epsilon": 2.0, "dp-delta": 1.0}}}]}', "δ = 1.0"),
        ('{"rounds": [{"train": {"site-0": {"dp-epsilon": -1, "dp-delta": 1e-5}}}]}', "ε = -1.0"),
    ],
)
def test_a_history_without_a_usable_privacy_budget_is_refused_naming_it(tmp_path: Path, text: str, fault: str) -> None:
    path = history(tmp_path, text)
    with pytest.raises(ExperimentError) as caught:
        arm_privacy(tmp_path)  # retest reads every arm's history this way before it tests any model
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and fault in message and "\n" not in message, message


def test_usable_privacy_budgets_are_read(tmp_path: Path) -> None:
    history(tmp_path, '{"rounds": [{"strategy": {"epsilon": 0, "delta": 0}}]}')
    assert arm_privacy(tmp_path) == (CLIENT_LEVEL, 0.0, 0.0)
    history(tmp_path, '{"rounds": [{"train": {"site-0": {"dp-epsilon": 8.5, "dp-delta": 1e-5}}}]}')
    assert arm_privacy(tmp_path) == (SAMPLE_LEVEL, 8.5, 1e-5)


# ---------------------------------------------------------------------------------------------- 6. synth
@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--sites", "100000", f"sites must be 1 to {UPPER_BOUNDS['min-sites']}, got 100000"),
        ("--subjects", "100000000", "subjects must be <= 1000, got 100000000"),
        ("--outside-subjects", "1000000000", "outside_subjects must be <= 1000, got 1000000000"),
        ("--seed", "-1", f"seed must be 0 to {2**32 - 1}, got -1"),
        ("--seed", str(2**32), f"seed must be 0 to {2**32 - 1}, got {2**32}"),
    ],
)
def test_synth_refuses_counts_past_its_bounds_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str, value: str, message: str
) -> None:
    def unbounded(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"synth {option} {value} started writing sites")

    monkeypatch.setattr(synth, "write_site", unbounded)  # before the bounds: until the disk was full
    code, output = cli("synth", tmp_path / "out", "--size", "tiny", option, value)
    assert code == 2 and output.strip().splitlines() == [f"error: {message}"], output
    assert not (tmp_path / "out").exists()


def test_synth_bounds_are_those_of_a_run_config() -> None:
    bounds = (synth.MAX_SITES, synth.MAX_SUBJECTS, synth.MAX_SEED)
    assert bounds == (UPPER_BOUNDS["min-sites"], UPPER_BOUNDS["synthetic-subjects"], UPPER_BOUNDS["seed"])


def test_a_saved_model_still_round_trips(tmp_path: Path) -> None:
    model = ModelCheckpoint.load(checkpoint(tmp_path / "model.pt", intensity=[-57, 164, 0, 1, True]))
    assert model.intensity is not None and model.intensity.to_list() == [-57.0, 164.0, 0.0, 1.0, True]
    assert model.patch_size == (16, 16, 16) and all(isinstance(p, int) for p in model.patch_size)
    assert torch.equal(
        model.state_dict["model.0.conv.unit0.conv.weight"],
        torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]["model.0.conv.unit0.conv.weight"],
    )
