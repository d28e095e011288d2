"""Progress bars: drawn for a person at a terminal, absent in CI and in files or pipes."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from fedseg.history import RoundRecord
from fedseg.progress import Bars, RoundBar, progress_enabled, track


def _terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_bars_only_on_a_terminal_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("FEDSEG_PROGRESS", raising=False)
    terminal, _ = _terminal()
    assert progress_enabled(terminal)
    assert not progress_enabled(Console(file=io.StringIO()))  # a file or pipe
    monkeypatch.setenv("CI", "true")
    assert not progress_enabled(terminal)
    monkeypatch.setenv("CI", "false")
    monkeypatch.setenv("FEDSEG_PROGRESS", "0")
    assert not progress_enabled(terminal)


def test_round_bar_follows_the_rounds_of_a_run() -> None:
    terminal, out = _terminal()
    with Bars(enabled=True, console=terminal) as bars:
        rounds = RoundBar(bars, bars.add("rounds", 0)).start("arm fedavg", rounds=2)
        for number, dice in enumerate((0.1, 0.4, 0.7)):
            rounds.log_round(RoundRecord(round=number, eval={"site-0": {"dice": dice}}))
    drawn = out.getvalue()
    assert "round 2  mean Dice 0.700" in drawn and "3/3" in drawn


def test_without_a_terminal_track_yields_everything_and_draws_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert list(track(range(4), "segmenting")) == [0, 1, 2, 3]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
