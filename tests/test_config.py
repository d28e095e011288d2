"""A bad run config fails before training, with a message naming the key and the problem."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedseg.config import ConfigError, RunConfig, flatten

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def default_run_config() -> dict:
    return flatten(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_are_valid_and_match_the_dataclass() -> None:
    config = RunConfig.from_mapping(default_run_config())
    assert config.strategy == "fedavg"
    assert config.patch_size == (32, 32, 32)
    assert config.spacing == (1.0, 1.0, 1.0) == RunConfig().spacing
    assert config.uses_synthetic_data


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("num-server-rounds", 0, "'num-server-rounds' must be >= 1, got 0"),
        ("learning-rate", "fast", "'learning-rate' must be a number, got 'fast'"),
        ("local-epochs", 0, "'local-epochs' must be > 0 (0.5: half a pass per round), got 0.0"),
        ("local-epochs", "two", "'local-epochs' must be a number, got 'two'"),
        ("model", "resnet", "'model' is 'resnet'; choose one of: unet, segresnet, dynunet, ahnet"),
        ("patch-size", "32,32", "'patch-size' needs 1 or 3 sizes"),
        ("patch-size", "a,b,c", "'patch-size' must be like"),
        ("spacing", "1.0,0,1.0", "'spacing' must be > 0 and <= 100 mm per axis"),
        ("spacing", "-0.5", "'spacing' must be > 0 and <= 100 mm per axis"),
        ("spacing", "1mm", "'spacing' must be like \"1.0,1.0,3.0\""),
        ("num-classes", 1, "'num-classes' must be >= 2"),
        ("round-timeout", -1.0, "'round-timeout' must be > 0"),
    ],
)
def test_bad_value_names_key_and_problem(key: str, value: object, message: str) -> None:
    values = {**default_run_config(), key: value}
    with pytest.raises(ConfigError, match=_literal(message)):
        RunConfig.from_mapping(values)


def test_fractional_local_epochs_except_under_dp_sgd() -> None:
    assert RunConfig.from_mapping({**default_run_config(), "local-epochs": 0.5}).local_epochs == 0.5
    dp = {**default_run_config(), "local-epochs": 0.5, "dp-sgd": True, "dp-noise-multiplier": 1.0}
    with pytest.raises(ConfigError, match=_literal("'local-epochs' is 0.5; DP-SGD trains whole epochs")):
        RunConfig.from_mapping(dp)


def test_unknown_key_lists_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown run-config key 'num-rounds'; valid keys: .*num-server-rounds"):
        RunConfig.from_mapping({"num-rounds": 3})


def test_patch_larger_than_synthetic_volume_is_refused() -> None:
    with pytest.raises(ConfigError, match="exceeds 'synthetic-size'"):
        RunConfig.from_mapping({"patch-size": 64, "synthetic-size": 40})


def test_toml_file_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('strategy = "fedavg"\npatch-size = "32,32,16"\nspacing = "0.5x0.5x3"\nlocal-epochs = 4\n')
    config = RunConfig.from_toml(path)
    assert config.patch_size == (32, 32, 16) and config.spacing == (0.5, 0.5, 3.0)
    assert config.to_dict()["patch-size"] == "32,32,16" and config.to_dict()["spacing"] == "0.5,0.5,3.0"
    assert RunConfig.from_mapping({"spacing": ""}).spacing is None  # "": each scan's native grid
    assert RunConfig.from_mapping({"spacing": ""}).to_dict()["spacing"] == ""
    assert config.local_epochs == 4


def test_unreadable_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("strategy = \n")
    with pytest.raises(ConfigError, match=r"broken.toml: cannot read run config"):
        RunConfig.from_toml(path)


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_check_config_command_rejects_bad_strategy_parameter(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedseg.cli import app

    path = tmp_path / "run.toml"
    path.write_text('strategy = "fedprox"\n"fedprox.proximal-mu" = "high"\n')
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "'fedprox.proximal-mu' must be a number, got 'high'" in result.output


def test_an_enormous_value_is_named_short_in_the_error_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedseg.cli import app

    path = tmp_path / "run.toml"
    path.write_text(f"dp-physical-batch-size = {10**308}\nlearning-rate = 0.001\n")
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert line.endswith("'dp-physical-batch-size' must be 0 (batch-size) to 1024, got 10000000…0000 (309 digits)")
    assert len(line.splitlines()) == 1 and len(line) < 200 + len(str(path))
    from fedseg.errors import one_line

    named = "/data/case_1234567890123456789012345/x.nii.gz: not a NIfTI file"  # a path keeps its digits
    assert one_line(f"{named}\n  more") == f"{named} more"


def test_check_config_command_validates_experiment_specs(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from fedseg.cli import app

    path = tmp_path / "experiment.toml"
    path.write_text(
        '[experiment]\nname = "x"\ndata-dir = "data"\nsites = 2\narms = ["private", "federated"]\n'
        'strategies = ["fedprox"]\n[run]\nnum-server-rounds = 3\nlocal-epochs = 1\n'
    )
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "arm private--site-0: private, fedavg, 3 round(s) x 1 epoch(s)",
        "arm private--site-1: private, fedavg, 3 round(s) x 1 epoch(s)",
        "arm fedprox--federation: federated, fedprox, 3 round(s) x 1 epoch(s)",
        "3 arms; valid",
    ]
    path.write_text(path.read_text() + '"fedprox.proximal-mu" = -1\n')
    result = CliRunner().invoke(app, ["check-config", str(path)])
    assert result.exit_code == 2
    assert f"{path}: run-config 'fedprox.proximal-mu' must be >= 0, got -1" in result.output
