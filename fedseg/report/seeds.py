"""`fedseg report RUN RUN ... --out DIR`: one study repeated with other seeds (another split of every site,
initial model and patch draws), summarised over the runs: each arm's % of the centralized model per run
and on average, its outside Dice, and paired tests pooled over every run's cases (a case is a run's
subject, so n grows with the runs while each pair still compares two models on the same scan)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseg.report.cases import CaseRow, CasesError, read_cases, read_structures
from fedseg.report.layout import CASES
from fedseg.report.tables import arm_summaries


@dataclass(frozen=True)
class Run:
    """One results folder of the study: its name and its cases."""

    name: str
    rows: list[CaseRow]


@dataclass(frozen=True)
class SeedSummary:
    """One arm over the runs: per run (NaN where the run lacks the arm) and the mean over the runs that have it."""

    arm: str
    kind: str
    percent: tuple[float, ...]  # internal Dice as % of the run's centralized model
    outside: tuple[float, ...]  # mean outside Dice

    @property
    def mean_percent(self) -> float:
        return _mean(self.percent)

    @property
    def mean_outside(self) -> float:
        return _mean(self.outside)


def read_runs(results_dirs: Sequence[str | Path]) -> list[Run]:
    """Each folder's cases; CasesError when fewer than two, one repeated, or the scored structures differ."""
    paths = [Path(d) for d in results_dirs]
    names = [p.resolve().name for p in paths]
    if len(paths) < 2:
        raise CasesError("a seeds summary needs at least two results folders")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise CasesError(f"results folder {repeated[0]} is given twice (runs are told apart by folder name)")
    structures = [read_structures(p / CASES) for p in paths]
    for path, scored in zip(paths, structures, strict=True):
        if scored != structures[0]:
            raise CasesError(
                f"{path / CASES}: scores structures {list(scored)}, {paths[0] / CASES} scores "
                f"{list(structures[0])}; runs of one study must score the same ones"
            )
    return [Run(name, read_cases(path / CASES)) for name, path in zip(names, paths, strict=True)]


def seed_summaries(runs: Sequence[Run]) -> list[SeedSummary]:
    """Every arm of any run, in first-seen order, with its figures in each run."""
    per_run = [{s.arm: s for s in arm_summaries(run.rows)} for run in runs]
    arms = list(dict.fromkeys(arm for summaries in per_run for arm in summaries))
    return [
        SeedSummary(
            arm=arm,
            kind=next(s[arm].kind for s in per_run if arm in s),
            percent=tuple(s[arm].percent_of_centralized if arm in s else math.nan for s in per_run),
            outside=tuple(s[arm].outside.mean if arm in s else math.nan for s in per_run),
        )
        for arm in arms
    ]


def pooled_rows(runs: Sequence[Run]) -> list[CaseRow]:
    """All runs' rows as one study whose subjects are named `run/subject`: a model (arm, trained on) is
    paired with another on the cases both were tested on, in every run."""
    return [dataclasses.replace(row, subject=f"{run.name}/{row.subject}") for run in runs for row in run.rows]


def _mean(values: Sequence[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan
