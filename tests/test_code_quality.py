"""Lint, format and type checks as part of the test suite (CI runs only pytest).

ruff and mypy read their settings from pyproject.toml ([tool.ruff], [tool.mypy]); a failure shows the
tool's own report.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECKS = {
    "ruff check": [sys.executable, "-m", "ruff", "check", "--no-fix", "--output-format", "concise", "."],
    "ruff format": [sys.executable, "-m", "ruff", "format", "--check", "--diff", "."],
    "mypy": [sys.executable, "-m", "mypy"],
}


@pytest.mark.parametrize("name", list(CHECKS))
def test_the_code_base_passes(name: str) -> None:
    result = subprocess.run(CHECKS[name], cwd=REPO, capture_output=True, text=True, check=False)
    report = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"{name} found problems (exit {result.returncode}):\n{report}"
