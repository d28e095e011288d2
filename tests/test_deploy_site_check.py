"""`fedseg site check`: data validation, then one dry forward pass, with a readable summary."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.data.synth import write_site


def test_site_check_validates_and_runs_the_model_once(tmp_path: Path) -> None:
    site = write_site(tmp_path, 0, 4, 24, 0)
    config = tmp_path / "run.toml"
    config.write_text('model = "unet"\nnum-classes = 3\npatch-size = "16,16,16"\n')
    result = CliRunner().invoke(app, ["site", "check", "--data-dir", str(site), "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert "4 subjects, 0 errors" in result.output
    assert "dry run: unet (" in result.output and "volume 24x24x24, 1 channel(s) -> 3 output maps" in result.output
    assert result.output.rstrip().endswith("ready to join")


def test_site_check_stops_before_the_model_when_data_is_broken(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["site", "check", "--data-dir", str(tmp_path / "nowhere")])
    assert result.exit_code == 1
    assert "[not-a-site]" in result.output and "not ready" in result.output
    assert "dry run" not in result.output
