"""Numbers of the report: cross-site Dice matrix, per-arm mean ± sd with a bootstrap confidence interval,
paired tests with false-discovery-rate adjusted P values (scipy)."""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedseg.report.cases import CaseRow, CasesError, mean_sd

Model = tuple[str, str]  # (arm, trained_on)
Case = tuple[str, str]  # (tested_on, subject)
CENTRAL = "centralized"  # the arm kind every other shared model is also paired with
OWN_SITES = "own sites"  # trained_on of a personal arm paired as one model (`own_site_arms`)
COMPARED_KINDS = ("federated", "personal", "cyclic", "centralized")  # compared case by case with each private model
REFERENCE_KINDS = ("federated", "centralized")  # without DP: the reference lines of Dice vs ε
CI_LEVEL = 0.95  # of the bootstrap confidence interval of an arm's mean Dice
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0  # a report is reproducible: the same cases.csv gives the same intervals
BOOTSTRAP_BATCH_VALUES = 2**20  # resampled values held at once (with their indices, 16 MiB)
MAX_PAIRED_TESTS = 20_000  # tests of one paired table (a line each, about a millisecond of scipy); experiments: ≤ 230


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


def by_arm(rows: Iterable[CaseRow]) -> dict[str, list[CaseRow]]:
    """Each arm's rows in file order, arms in the order first seen: one pass over the rows, where filtering
    them once per arm would take (arms × rows)."""
    groups: dict[str, list[CaseRow]] = {}
    for row in rows:
        groups.setdefault(row.arm, []).append(row)
    return groups


def by_model(rows: Iterable[CaseRow]) -> dict[Model, list[CaseRow]]:
    """Each model's rows in file order, models in the order first seen (`models`), in one pass."""
    groups: dict[Model, list[CaseRow]] = {}
    for row in rows:
        groups.setdefault(row.model, []).append(row)
    return groups


def model_labeller(rows: Iterable[CaseRow]) -> Callable[[Model], str]:
    """A model's label (one of the rows' or not), from one pass over the rows: the arm's name, plus where it
    was trained when the arm has several models."""
    trained: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        trained[row.arm].add(row.trained_on)

    def label(model: Model) -> str:
        arm, trained_on = model
        return f"{arm} ({trained_on})" if len(trained.get(arm, ())) > 1 else arm

    return label


def model_labels(rows: Sequence[CaseRow]) -> dict[Model, str]:
    """`model_labeller`'s label of every model, in two passes over the rows."""
    label = model_labeller(rows)
    return {model: label(model) for model in models(rows)}


def test_sets(rows: Sequence[CaseRow]) -> list[str]:
    """Tested-on names: internal sites in natural order, then outside institutions."""
    inside = sorted({r.tested_on for r in rows if not r.outside}, key=_natural)
    outside = sorted({r.tested_on for r in rows if r.outside}, key=_natural)
    return inside + outside


def cross_site_matrix(rows: Sequence[CaseRow]) -> dict[Model, dict[str, Cell]]:
    """trained-on model × tested-on set → mean ± sd of per-case Dice (empty cells are absent)."""
    scores: dict[Model, dict[str, list[float]]] = {}
    for row in rows:
        scores.setdefault(row.model, {}).setdefault(row.tested_on, []).append(row.score)
    column = {name: i for i, name in enumerate(test_sets(rows))}
    return {
        model: {name: Cell.of(by_set[name]) for name in sorted(by_set, key=column.__getitem__)}
        for model, by_set in scores.items()
    }


def arm_summaries(rows: Sequence[CaseRow]) -> list[ArmSummary]:
    """Per arm: mean ± sd on the internal test sets and on the outside institution, % of centralized."""
    groups = by_arm(rows)
    scores = {arm: [r.score for r in own if not r.outside] for arm, own in groups.items()}
    internal = {arm: Cell.of(scores[arm]) for arm in groups}
    central = next((r.arm for r in rows if r.kind == "centralized"), None)
    reference = internal[central].mean if central is not None else math.nan
    return [
        ArmSummary(
            arm=arm,
            kind=own[0].kind,
            internal=internal[arm],
            outside=Cell.of([r.score for r in own if r.outside]),
            percent_of_centralized=100.0 * internal[arm].mean / reference if reference > 0 else math.nan,
            internal_ci=bootstrap_ci(scores[arm]),
        )
        for arm, own in groups.items()
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
    groups = by_arm(rows)
    central = next((r.arm for r in rows if r.kind == "centralized"), None)
    out = []
    for index, structure in enumerate(structures):
        reference = structure_cell(groups[central], index, False).mean if central is not None else math.nan
        out += [structure_summary(arm, structure, index, own, reference) for arm, own in groups.items()]
    return out


def structure_summary(
    arm: str, structure: str, index: int, own: Sequence[CaseRow], reference: float
) -> StructureSummary:
    """`arm`'s summary of the `index`-th structure from its rows `own`; `reference`: the centralized model's
    internal mean Dice of that structure (NaN without one)."""
    internal = structure_cell(own, index, False)
    percent = 100.0 * internal.mean / reference if reference > 0 else math.nan
    return StructureSummary(arm, structure, internal, structure_cell(own, index, True), percent)


def structure_cell(rows: Sequence[CaseRow], index: int, outside: bool) -> Cell:
    """The `index`-th structure's Dice over the rows' internal (or outside) cases."""
    return Cell.of([r.dice[index] for r in rows if r.outside == outside])


def privacy_points(rows: Sequence[CaseRow]) -> list[PrivacyPoint]:
    """Every model trained with DP, ordered by DP kind, then ε."""
    points = []
    for model, own in by_model(rows).items():
        if own[0].dp_kind:
            internal = Cell.of([r.score for r in own if not r.outside])
            points.append(PrivacyPoint(model, own[0].dp_kind, own[0].epsilon, own[0].delta, internal))
    return sorted(points, key=lambda p: (p.dp_kind, p.epsilon))


def privacy_references(rows: Sequence[CaseRow]) -> dict[Model, Cell]:
    """Internal-test Dice of the federated and centralized models trained without DP."""
    return {
        model: Cell.of([r.score for r in own if not r.outside])
        for model, own in by_model(rows).items()
        if any(r.kind in REFERENCE_KINDS and not r.dp_kind for r in own)
    }


def paired_tests(
    rows: Sequence[CaseRow], reference_kind: str = "private", *, outside: bool = False
) -> list[PairedTest]:
    """Each model of the COMPARED_KINDS other than `reference_kind` against each model of that kind ("private"
    or "centralized"), paired by internal test case (`outside`: by outside-institution case; models without
    such cases are left out); the P values of each test kind adjusted for the number of comparisons
    (Benjamini–Hochberg, `fdr_adjusted`)."""
    scores = paired_scores(rows, outside, own_site_arms(rows))
    places = KeyPlaces(scores)
    return adjusted(
        [
            paired_test(model, ref, scores[model], scores[ref], places.of(model))
            for model, ref in model_pairs(rows, reference_kind)
            if model in scores and ref in scores
        ]
    )


class KeyPlaces:
    """Each model's case keys (`case_scores`) → their places in its scores, computed once per model and only
    when `paired_test` needs them (to pair a model with smaller ones from their side)."""

    def __init__(self, scores: Mapping[Model, Mapping[Case, float]]) -> None:
        self.scores = scores
        self.places: dict[Model, dict[Case, int]] = {}

    def of(self, model: Model) -> Callable[[], Mapping[Case, int]]:
        def places() -> Mapping[Case, int]:
            if model not in self.places:
                self.places[model] = {key: i for i, key in enumerate(self.scores[model])}
            return self.places[model]

        return places


def model_pairs(rows: Sequence[CaseRow], reference_kind: str) -> list[tuple[Model, Model]]:
    """(model, reference) for each model of the COMPARED_KINDS other than `reference_kind` and each model of
    it; against the centralized model also each personal arm as one model (`own_site_arms`), after its
    per-site models."""
    compared, references = _pairing(rows, reference_kind)
    return [(model, ref) for model in compared for ref in references]


def _pairing(rows: Sequence[CaseRow], reference_kind: str) -> tuple[list[Model], list[Model]]:
    """(the models compared, the reference models) of `model_pairs`."""
    kinds = model_kinds(rows)
    references = [m for m in models(rows) if kinds[m] == reference_kind]
    candidates = compared_models(rows) if reference_kind == CENTRAL else models(rows)
    compared = [m for m in candidates if kinds[m] in COMPARED_KINDS and kinds[m] != reference_kind]
    return compared, references


def check_paired_tests(rows: Sequence[CaseRow], source: str) -> None:
    """CasesError naming `source` (the cases files) when `model_pairs` against the private or the centralized
    models would give a table of more than MAX_PAIRED_TESTS tests."""
    for kind in ("private", CENTRAL):
        compared, references = _pairing(rows, kind)
        check_pair_count(len(compared), len(references), kind, source)


def check_pair_count(compared: int, references: int, kind: str, source: str) -> None:
    """CasesError naming `source` when `compared` models, each paired with `references` models of `kind`,
    are more than MAX_PAIRED_TESTS tests."""
    if compared * references > MAX_PAIRED_TESTS:
        raise CasesError(
            f"{source}: {compared} models to pair with each of {references} {kind} models, "
            f"{compared * references} paired tests, more than the {MAX_PAIRED_TESTS} a report table may have"
        )


def model_kinds(rows: Sequence[CaseRow]) -> dict[Model, str]:
    """Each model's arm kind, the personal arms as one model (`own_site_arms`) included."""
    kinds: dict[Model, str] = {}
    first: dict[str, str] = {}  # each arm's kind in its first row
    for row in rows:
        kinds[row.model] = row.kind
        first.setdefault(row.arm, row.kind)
    return kinds | {(arm, own): first[arm] for arm, own in own_site_arms(rows)}


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
    arms: dict[str, list[dict[tuple[str, str], float]]] = defaultdict(list)  # arm → its models' scores
    for (arm, _), by_case in scores.items():
        arms[arm].append(by_case)
    for arm, own in own_site:
        cases = {case: v for by_case in arms.get(arm, []) for case, v in by_case.items()}
        if cases:
            scores[(arm, own)] = cases
    return scores


def adjusted(tests: Sequence[PairedTest]) -> list[PairedTest]:
    """The tests with their Benjamini–Hochberg q values over this set of comparisons."""
    q_wilcoxon, q_ttest = fdr_adjusted([t.p_wilcoxon for t in tests]), fdr_adjusted([t.p_ttest for t in tests])
    return [
        dataclasses.replace(t, q_wilcoxon=qw, q_ttest=qt) for t, qw, qt in zip(tests, q_wilcoxon, q_ttest, strict=True)
    ]


def paired_test(
    model: Model, reference: Model, ours: dict, theirs: dict, places: Callable[[], Mapping] | None = None
) -> PairedTest:
    """Wilcoxon signed-rank and paired t of `ours` against `theirs` on the keys both score (not NaN), in the
    order of `ours`. `places` (a key of `ours` → its place: `KeyPlaces`) lets the keys be found from the side
    of a smaller `theirs`: one model paired with many must not walk all its cases for each."""
    if places is not None and len(theirs) < len(ours):
        shared = sorted((k for k in theirs if k in ours), key=places().__getitem__)
    else:
        shared = [k for k in ours if k in theirs]
    keys = [k for k in shared if not math.isnan(ours[k]) and not math.isnan(theirs[k])]
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
