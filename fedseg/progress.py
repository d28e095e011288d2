"""Progress bars (rich) for long commands: experiment arms and rounds, predict over a folder, synth.

Shown only on an interactive terminal: not when the output is a file or a pipe, not in CI ($CI set,
as CI services do), and not with FEDSEG_PROGRESS=0. Otherwise every call here is a no-op, and the
commands print their usual lines.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from fedseg.history import RoundRecord

T = TypeVar("T")
SWITCH = "FEDSEG_PROGRESS"  # "0": never show bars


def progress_enabled(console: Console | None = None) -> bool:
    """Bars only for a person at a terminal: not in CI, not into files or pipes, not when switched off."""
    if os.environ.get(SWITCH, "1") == "0" or os.environ.get("CI", "").lower() not in ("", "0", "false"):
        return False
    return (console or Console(stderr=True)).is_terminal


class Bars:
    """A rich Progress on stderr when enabled (its tasks: one bar each), else a set of no-ops."""

    def __init__(self, enabled: bool | None = None, console: Console | None = None) -> None:
        console = console or Console(stderr=True)
        self.enabled = progress_enabled(console) if enabled is None else enabled
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=False,
            disable=not self.enabled,
        )

    def __enter__(self) -> Self:
        self._progress.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._progress.__exit__(exc_type, exc, traceback)

    def add(self, description: str, total: int) -> TaskID:
        return self._progress.add_task(description, total=total)

    def advance(self, task: TaskID, description: str | None = None) -> None:
        self._progress.update(task, advance=1, description=description or None)  # None: keeps the description

    def reset(self, task: TaskID, description: str, total: int, completed: int = 0) -> None:
        self._progress.reset(task, total=total, completed=completed, description=description)


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """`items`, with a bar of `description` while they are consumed (more than one item only)."""
    items = list(items) if total is None else items
    count = len(items) if total is None else total  # type: ignore[arg-type]
    with Bars(enabled=None if count > 1 else False) as bars:
        task = bars.add(description, count)
        for item in items:
            yield item
            bars.advance(task)


class RoundBar:
    """A Tracker (fedseg.tracking) that advances a bar of rounds; round 0, the initial model, counts too."""

    def __init__(self, bars: Bars, task: TaskID) -> None:
        self._bars, self._task = bars, task

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_round(self, record: RoundRecord) -> None:
        dice = f"  mean Dice {record.mean_dice:.3f}" if record.eval else ""
        self._bars.reset(self._task, f"  round {record.round}{dice}", total=self._total, completed=record.round + 1)

    def start(self, description: str, rounds: int) -> RoundBar:
        self._total = rounds + 1
        self._bars.reset(self._task, description, total=self._total)
        return self

    def close(self, failed: bool = False) -> None:
        pass


@contextmanager
def experiment_bars(arms: int) -> Iterator[tuple[Bars, TaskID, RoundBar]]:
    """Two bars for `fedseg experiment`: its arms, and the rounds of the arm that trains."""
    with Bars() as bars:
        yield bars, bars.add("arms", arms), RoundBar(bars, bars.add("  rounds", 0))
