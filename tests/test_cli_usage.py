"""A mistyped command is named once, with one suggestion of the nearest command; help texts keep their
TOML table names (rich reads "[run]" as a style tag unless escaped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedseg.cli import app as cli


def _plain(output: str) -> str:
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", output).split())


@pytest.mark.parametrize(
    ("args", "typo", "suggestion"),
    [(["validate", "x"], "validate", "validate-data"), (["site", "joni"], "joni", "join")],
)
def test_a_mistyped_command_gets_one_suggestion(args: list[str], typo: str, suggestion: str) -> None:
    result = CliRunner().invoke(cli, args, terminal_width=200)
    text = _plain(result.output)
    assert result.exit_code == 2, text
    assert f"No such command '{typo}'." in text
    assert text.count("Did you mean") == 1 and f"Did you mean '{suggestion}'?" in text, text


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (["check-config", "--help"], "experiment spec ([experiment] table)"),
        (["experiment", "--help"], "the config's [run] seed"),
    ],
)
def test_help_keeps_toml_table_names(args: list[str], phrase: str) -> None:
    result = CliRunner().invoke(cli, args, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert phrase in _plain(result.output), result.output


def test_check_config_warns_of_strategy_keys_nothing_reads(tmp_path: Path) -> None:
    run = tmp_path / "run.toml"
    run.write_text('strategy = "fedavg"\n[fedprox]\nproximal-mu = 0.1\n')
    result = CliRunner().invoke(cli, ["check-config", str(run)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert (
        "run-config key 'fedprox.proximal-mu' belongs to another strategy than the selected 'fedavg'" in result.output
    )
    spec = tmp_path / "experiment.toml"
    spec.write_text(
        '[experiment]\nname = "x"\ndata-dir = "data"\nsites = 2\nstrategies = ["fedavg", "scaffold"]\n'
        "[run.fedprox]\nproximal-mu = 0.1\n[run.scaffold]\nmax-update-ratio = 50.0\n"
    )
    result = CliRunner().invoke(cli, ["check-config", str(spec)], terminal_width=200)
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {spec}: [run] key 'fedprox.proximal-mu' belongs to a strategy no arm uses (fedavg, scaffold); "
        "the experiment ignores it"
    ], result.output
