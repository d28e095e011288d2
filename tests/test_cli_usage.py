"""A mistyped command is named once, with one suggestion of the nearest command."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from fedseg.cli import app as cli


@pytest.mark.parametrize(
    ("args", "typo", "suggestion"),
    [(["validate", "x"], "validate", "validate-data"), (["site", "joni"], "joni", "join")],
)
def test_a_mistyped_command_gets_one_suggestion(args: list[str], typo: str, suggestion: str) -> None:
    result = CliRunner().invoke(cli, args, terminal_width=200)
    text = " ".join(re.sub(r"[│╭╮╰╯─]", " ", result.output).split())
    assert result.exit_code == 2, text
    assert f"No such command '{typo}'." in text
    assert text.count("Did you mean") == 1 and f"Did you mean '{suggestion}'?" in text, text
