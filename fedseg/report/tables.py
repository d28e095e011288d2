"""Numbers of the report: cross-site Dice matrix, per-arm mean ± sd with a bootstrap confidence interval,
paired tests with false-discovery-rate adjusted P values (scipy)."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedseg.report.cases import CaseRow, mean_sd

Model = tuple[str, str]  # (arm, trained_on)
CENTRAL = "centralized"  # the arm kind every other shared model is also paired with
OWN_SITES = "own sites"  # trained_on of a personal arm paired as one model (`own_site_arms`)
COMPARED_KINDS = ("federated", "personal", "cyclic", "centralized")  # compared case by case with each private model
REFERENCE_KINDS = ("federated", "centralized")  # without DP: the reference lines of Dice vs ε
CI_LEVEL = 0.95  # of the bootstrap confidence interval of an arm's mean Dice
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # a report is reproducible: the same cases.csv gives the same intervals
BOOTSTRAP_BATCH_VALUES = 2**20  # resampled values held at once (with their indices, 16 MiB)


@dataclass(frozen=True)
class Cell:
    """Mean ± sample sd of per-case Dice over n cases."""

    mean: float
    sd: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Cell:
        return cls(*mean_sd(values))


@dataclass(frozen=True)
class ArmSummary:
    """One arm over all its models: internal test sets pooled, and the outside institution."""

    arm: str
    kind: str
    internal: Cell
    outside: Cell
    percent_of_centralized: float  # NaN without a centralized arm
    internal_ci: tuple[float, float] = (math.nan, math.nan)  # bootstrap CI of the internal mean (`bootstrap_ci`)


@dataclass(frozen=True)
class PairedTest:
    """`model` vs a reference model (a private or the centralized one) on the same test cases, internal or
    outside (difference = model − reference)."""

    model: Model
    reference: Model
    n: int
    mean_difference: float
    p_wilcoxon: float
    p_ttest: float
    q_wilcoxon: float = math.nan  # Benjamini–Hochberg adjusted over the report's paired tests (`fdr_adjusted`)
    q_ttest: float = math.nan


@dataclass(frozen=True)
class PrivacyPoint:
    """One model trained with DP: its final (ε, δ) and mean ± sd Dice on the internal test sets."""

    model: Model
    dp_kind: str
    epsilon: float
    delta: float
    internal: Cell


def models(rows: Sequence[CaseRow]) -> list[Model]:
    """Every (arm, trained_on) in the order first seen."""
    return list(dict.fromkeys(row.model for row in rows))


def model_label(model: Model, rows: Sequence[CaseRow]) -> str:
    """The arm's name, plus where it was trained when the arm has several models."""
    arm, trained_on = model
    several = len({r.trained_on for r in rows if r.arm == arm}) > 1
    return f"{arm} ({trained_on})" if several else arm


def model_labels(rows: Sequence[CaseRow]) -> dict[Model, str]:
    """`model_label` of every model, in one pass over the rows."""
    trained: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        trained[row.arm].add(row.trained_on)
    return {(arm, on): f"{arm} ({on})" if len(trained[arm]) > 1 else arm for arm, on in models(rows)}


def test_sets(rows: Sequence[CaseRow]) -> list[str]:
    """Tested-on names: internal sites in natural order, then outside institutions."""
    inside = sorted({r.tested_on for r in rows if not r.outside}, key=_natural)
    outside = sorted({r.tested_on for r in rows if r.outside}, key=_natural)
    return inside + outside


def cross_site_matrix(rows: Sequence[CaseRow]) -> dict[Model, dict[str, Cell]]:
    """trained-on model × tested-on set → mean ± sd of per-case Dice (empty cells are absent)."""
    scores: dict[Model, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        scores[row.model][row.tested_on].append(row.score)
    return {
        model: {name: Cell.of(scores[model][name]) for name in test_sets(rows) if name in scores[model]}
        for model in models(rows)
    }


def arm_summaries(rows: Sequence[CaseRow]) -> list[ArmSummary]:
    """Per arm: mean ± sd on the internal test sets and on the outside institution, % of centralized."""
    arms = list(dict.fromkeys(r.arm for r in rows))
    scores = {arm: [r.score for r in rows if r.arm == arm and not r.outside] for arm in arms}
    internal = {arm: Cell.of(scores[arm]) for arm in arms}
    central = next((r.arm for r in rows if r.kind == "centralized"), None)
    reference = internal[central].mean if central is not None else math.nan
    return [
        ArmSummary(
            arm=arm,
            kind=next(r.kind for r in rows if r.arm == arm),
            internal=internal[arm],
            outside=Cell.of([r.score for r in rows if r.arm == arm and r.outside]),
            percent_of_centralized=100.0 * internal[arm].mean / reference if reference > 0 else math.nan,
            internal_ci=bootstrap_ci(scores[arm]),
        )
        for arm in arms
    ]


def bootstrap_ci(values: Sequence[float], level: float = CI_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of the non-NaN `values` (cases resampled with
    replacement, `BOOTSTRAP_RESAMPLES` times, seeded, in batches of at most BOOTSTRAP_BATCH_VALUES values);
    NaN for fewer than 2 values."""
    finite = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if finite.size < 2:
        return math.nan, math.nan
    result = stats.bootstrap(
        (finite,),
        np.mean,
        confidence_level=level,
        n_resamples=BOOTSTRAP_RESAMPLES,
        method="percentile",
        rng=np.random.default_rng(BOOTSTRAP_SEED),
        batch=max(1, BOOTSTRAP_BATCH_VALUES // finite.size),  # the same draws and interval as all at once
    )
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def fdr_adjusted(p_values: Sequence[float]) -> list[float]:
    """Benjamini–Hochberg adjusted P values (scipy's false_discovery_control) over the non-NaN ones;
    NaN stays NaN (a test that could not be run is no member of the family)."""
    ps = np.asarray(p_values, dtype=float)
    adjusted = np.full(ps.shape, math.nan)
    finite = ~np.isnan(ps)
    if finite.any():
        adjusted[finite] = stats.false_discovery_control(ps[finite], method="bh")
    return [float(q) for q in adjusted]


@dataclass(frozen=True)
class StructureSummary:
    """One arm, one scored structure (class or tumour region): internal and outside Dice, % of centralized."""

    arm: str
    structure: str
    internal: Cell
    outside: Cell
    percent_of_centralized: float


def structure_summaries(rows: Sequence[CaseRow], structures: Sequence[str]) -> list[StructureSummary]:
    """Per arm and per structure (the i-th Dice column): the arm summary restricted to that structure."""
    arms = list(dict.fromkeys(r.arm for r in rows))
    central = next((r.arm for r in rows if r.kind == "centralized"), None)
    out = []
    for index, structure in enumerate(structures):

        def cell(arm: str, outside: bool, index: int = index) -> Cell:
            return Cell.of([r.dice[index] for r in rows if r.arm == arm and r.outside == outside])

        reference = cell(central, False).mean if central is not None else math.nan
        for arm in arms:
            internal = cell(arm, False)
            percent = 100.0 * internal.mean / reference if reference > 0 else math.nan
            out.append(StructureSummary(arm, structure, internal, cell(arm, True), percent))
    return out


def privacy_points(rows: Sequence[CaseRow]) -> list[PrivacyPoint]:
    """Every model trained with DP, ordered by DP kind, then ε."""
    points = []
    for model in models(rows):
        own = [r for r in rows if r.model == model]
        if own[0].dp_kind:
            internal = Cell.of([r.score for r in own if not r.outside])
            points.append(PrivacyPoint(model, own[0].dp_kind, own[0].epsilon, own[0].delta, internal))
    return sorted(points, key=lambda p: (p.dp_kind, p.epsilon))


def privacy_references(rows: Sequence[CaseRow]) -> dict[Model, Cell]:
    """Internal-test Dice of the federated and centralized models trained without DP."""
    return {
        model: Cell.of([r.score for r in rows if r.model == model and not r.outside])
        for model in models(rows)
        if any(r.model == model and r.kind in REFERENCE_KINDS and not r.dp_kind for r in rows)
    }


def paired_tests(
    rows: Sequence[CaseRow], reference_kind: str = "private", *, outside: bool = False
) -> list[PairedTest]:
    """Each model of the COMPARED_KINDS other than `reference_kind` against each model of that kind ("private"
    or "centralized"), paired by internal test case (`outside`: by outside-institution case; models without
    such cases are left out); the P values of each test kind adjusted for the number of comparisons
    (Benjamini–Hochberg, `fdr_adjusted`)."""
    scores = paired_scores(rows, outside, own_site_arms(rows))
    return adjusted(
        [
            paired_test(model, ref, scores[model], scores[ref])
            for model, ref in model_pairs(rows, reference_kind)
            if model in scores and ref in scores
        ]
    )


def model_pairs(rows: Sequence[CaseRow], reference_kind: str) -> list[tuple[Model, Model]]:
    """(model, reference) for each model of the COMPARED_KINDS other than `reference_kind` and each model of
    it; against the centralized model also each personal arm as one model (`own_site_arms`), after its
    per-site models."""
    kinds = model_kinds(rows)
    references = [m for m in models(rows) if kinds[m] == reference_kind]
    candidates = compared_models(rows) if reference_kind == CENTRAL else models(rows)
    compared = [m for m in candidates if kinds[m] in COMPARED_KINDS and kinds[m] != reference_kind]
    return [(model, ref) for model in compared for ref in references]


def model_kinds(rows: Sequence[CaseRow]) -> dict[Model, str]:
    """Each model's arm kind, the personal arms as one model (`own_site_arms`) included."""
    kinds = {row.model: row.kind for row in rows}
    return kinds | {(arm, own): next(r.kind for r in rows if r.arm == arm) for arm, own in own_site_arms(rows)}


def compared_models(rows: Sequence[CaseRow]) -> list[Model]:
    """`models`, then each personal arm as one model (`own_site_arms`)."""
    return models(rows) + own_site_arms(rows)


def own_site_arms(rows: Sequence[CaseRow]) -> list[Model]:
    """(arm, OWN_SITES) for each arm of several models that tests each of them only on its own site's
    internal cases: a personal arm (`<strategy>-personal`, Ditto's `-ensemble`). Its models together score
    each internal case once, by the case's own site's model, so the arm is paired as one model. Arms
    whose models are tested on other sites or outside (private, fine-tuned, leave-one-out) are not."""
    trained: dict[str, set[str]] = defaultdict(set)
    elsewhere = set()
    for row in rows:
        trained[row.arm].add(row.trained_on)
        if row.outside or row.trained_on != row.tested_on:
            elsewhere.add(row.arm)
    return [(arm, OWN_SITES) for arm, sites in trained.items() if len(sites) > 1 and arm not in elsewhere]


def paired_scores(
    rows: Sequence[CaseRow], outside: bool, own_site: Sequence[Model]
) -> dict[Model, dict[tuple[str, str], float]]:
    """`case_scores`, plus each arm of `own_site` (`own_site_arms`, over every run pooled) as one model."""
    scores = case_scores(rows, outside)
    for arm, own in own_site:
        cases = {case: v for (a, _), by_case in scores.items() if a == arm for case, v in by_case.items()}
        if cases:
            scores[(arm, own)] = cases
    return scores


def adjusted(tests: Sequence[PairedTest]) -> list[PairedTest]:
    """The tests with their Benjamini–Hochberg q values over this set of comparisons."""
    q_wilcoxon, q_ttest = fdr_adjusted([t.p_wilcoxon for t in tests]), fdr_adjusted([t.p_ttest for t in tests])
    return [
        dataclasses.replace(t, q_wilcoxon=qw, q_ttest=qt) for t, qw, qt in zip(tests, q_wilcoxon, q_ttest, strict=True)
    ]


def paired_test(model: Model, reference: Model, ours: dict, theirs: dict) -> PairedTest:
    """Wilcoxon signed-rank and paired t of `ours` against `theirs` on the keys both score (not NaN)."""
    keys = [k for k in ours if k in theirs and not math.isnan(ours[k]) and not math.isnan(theirs[k])]
    a = np.array([ours[k] for k in keys])
    b = np.array([theirs[k] for k in keys])
    if len(keys) < 2:
        return PairedTest(model, reference, len(keys), float(np.mean(a - b)) if keys else math.nan, math.nan, math.nan)
    if np.allclose(a, b):
        return PairedTest(model, reference, len(keys), 0.0, 1.0, 1.0)
    return PairedTest(
        model=model,
        reference=reference,
        n=len(keys),
        mean_difference=float(np.mean(a - b)),
        p_wilcoxon=float(stats.wilcoxon(a, b, alternative="two-sided").pvalue),
        p_ttest=_ttest_p(a, b),
    )


def _ttest_p(a: np.ndarray, b: np.ndarray) -> float:
    """Paired t-test P value; differences all equal (but not 0) give t = ±inf, P = 0, without scipy's warning
    of precision loss on stderr."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Precision loss occurred in moment calculation", RuntimeWarning)
        return float(stats.ttest_rel(a, b).pvalue)


def case_scores(rows: Sequence[CaseRow], outside: bool) -> dict[Model, dict[tuple[str, str], float]]:
    """model → (tested on, subject) → the case's Dice, internal or outside cases."""
    scores: dict[Model, dict[tuple[str, str], float]] = defaultdict(dict)
    for row in rows:
        if row.outside == outside:
            scores[row.model][(row.tested_on, row.subject)] = row.score
    return scores


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
