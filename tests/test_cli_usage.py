"""A mistyped command is named once, with one suggestion of the nearest command; help texts keep their
TOML table names (rich reads "[run]" as a style tag unless escaped)."""

from __future__ import annotations

import re

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
