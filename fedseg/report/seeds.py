"""`fedseg report RUN RUN ... --out DIR`: one study repeated with other seeds (another split of every site,
initial model and patch draws), summarised over the runs: each arm's % of the centralized model per run
and on average, its outside Dice, and paired tests over the runs' cases.

A scan can be a test case in several runs (the outside institution's in every one, an internal subject
whenever two splits put it in the test set), so the pooled tests count each scan once: its Dice under a
model, averaged over the runs that tested both compared models on it."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedseg.report.cases import CaseRow, CasesError, mean_sd, read_cases, read_structures
from fedseg.report.layout import CASES
from fedseg.report.tables import (
    Model,
    PairedTest,
    adjusted,
    arm_summaries,
    case_scores,
    model_pairs,
    own_site_arms,
    paired_scores,
    paired_test,
)


@dataclass(frozen=True)
class Run:
    """One results folder of the study: its name and its cases."""

    name: str
    rows: list[CaseRow]


@dataclass(frozen=True)
class SeedSummary:
    """One arm over the runs: per run (NaN where the run lacks the arm, or % where it lacks a centralized
    model) and the mean over the runs with a value."""

    arm: str
    kind: str
    percent: tuple[float, ...]  # internal Dice as % of the run's centralized model
    outside: tuple[float, ...]  # mean outside Dice

    @property
    def mean_percent(self) -> float:
        return mean_sd(self.percent)[0]

    @property
    def mean_outside(self) -> float:
        return mean_sd(self.outside)[0]


def read_runs(results_dirs: Sequence[str | Path], minimum: int = 2) -> list[Run]:
    """Each folder's cases; CasesError when fewer than `minimum` (a seeds summary needs two), one
    repeated, two share a name, or the scored structures differ."""
    paths = [Path(d) for d in results_dirs]
    if len(paths) < minimum:
        raise CasesError("a seeds summary needs at least two results folders" if minimum == 2 else "no results folder")
    resolved = [p.resolve() for p in paths]
    for i, path in enumerate(resolved):
        for other in resolved[:i]:
            if path == other:
                raise CasesError(f"results folder {paths[i]} is given twice")
            if path.name == other.name:
                raise CasesError(
                    f"results folders {other} and {path} share the name {path.name}; runs are told apart by it"
                )
    runs = [Run(path.name, read_cases(path / CASES)) for path in resolved]
    structures = [read_structures(path / CASES) for path in resolved]
    for path, scored in zip(paths, structures, strict=True):
        if scored != structures[0]:
            raise CasesError(
                f"{path / CASES}: scores structures {list(scored)}, {paths[0] / CASES} scores "
                f"{list(structures[0])}; runs of one study must score the same ones"
            )
    return runs


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


@dataclass(frozen=True)
class ModelOutside:
    """One model (arm, trained on) on the outside institution over the runs."""

    model: Model
    outside: tuple[float, ...]  # its mean outside Dice per run (NaN where the run lacks it)
    best: int  # runs in which it has the highest mean outside Dice of all models

    @property
    def mean(self) -> float:
        return mean_sd(self.outside)[0]


def outside_by_model(runs: Sequence[Run]) -> list[ModelOutside]:
    """Every model tested outside in any run, in first-seen order: per run its mean outside Dice, and
    the runs in which it is the best model outside."""
    per_run = []
    for run in runs:
        scored = {
            model: [v for v in scans.values() if not math.isnan(v)]
            for model, scans in case_scores(run.rows, outside=True).items()
        }
        per_run.append({model: sum(v) / len(v) for model, v in scored.items() if v})
    winners = [max(means, key=means.__getitem__) for means in per_run if means]
    found = list(dict.fromkeys(model for means in per_run for model in means))
    return [
        ModelOutside(model, tuple(means.get(model, math.nan) for means in per_run), winners.count(model))
        for model in found
    ]


def pooled_tests(runs: Sequence[Run], reference_kind: str, *, outside: bool = False) -> list[PairedTest]:
    """`paired_tests` over all runs, a scan counted once: for each (model, reference) pair, each scan's Dice
    under either model averaged over the runs that have both models and scored both on it."""
    pooled = run_rows(runs)
    own_site = own_site_arms(pooled)
    per_run = [paired_scores(run.rows, outside, own_site) for run in runs]
    tests = []
    for model, ref in model_pairs(pooled, reference_kind):
        ours: dict[tuple[str, str], list[float]] = defaultdict(list)
        theirs: dict[tuple[str, str], list[float]] = defaultdict(list)
        for scores in per_run:
            for key in scores.get(model, {}).keys() & scores.get(ref, {}).keys():
                a, b = scores[model][key], scores[ref][key]
                if not (math.isnan(a) or math.isnan(b)):
                    ours[key].append(a)
                    theirs[key].append(b)
        if ours:
            tests.append(paired_test(model, ref, scan_means(ours), scan_means(theirs)))
    return adjusted(tests)


def run_rows(runs: Sequence[Run]) -> list[CaseRow]:
    """Every run's case rows, in run order."""
    return [row for run in runs for row in run.rows]


def scan_means(values: dict[tuple[str, str], list[float]]) -> dict[tuple[str, str], float]:
    """Each scan's Dice values (over runs) → their mean."""
    return {key: sum(v) / len(v) for key, v in values.items()}
