"""`fedseg report RUN ... --against RUN,... --out DIR`: two configurations of one study, each run at one or
more seeds, compared model by model: every model both trained (same arm, same training data) is paired
with itself on the same scans, and each configuration's models with the other's centralized model.
`--pair OURS=THEIRS` also pairs an arm of the first configuration with a differently named arm of the
second (e.g. a new strategy against FedAvg, or against Ditto's global model, which is FedAvg's), each of
its models with the model of the same training data.

Within a configuration a scan's Dice under a model is averaged over its runs that tested the scan (as in
the seeds report), so each scan is one case; the two configurations' values of a scan form a pair
(Wilcoxon signed-rank and paired t; Benjamini–Hochberg q over the models of the table). Give both the
same seeds of the same data: then each scan is tested equally often on both sides."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedseg.report.cases import CaseRow, CasesError, read_structures
from fedseg.report.layout import CASES
from fedseg.report.seeds import Run, read_runs, run_rows, scan_means, seed_summaries
from fedseg.report.software import software_section
from fedseg.report.summary import REPORT, format_number, markdown_table, paired_cells, paired_markdown
from fedseg.report.tables import (
    CENTRAL,
    COMPARED_KINDS,
    KeyPlaces,
    Model,
    PairedTest,
    adjusted,
    check_pair_count,
    compared_models,
    model_kinds,
    model_labeller,
    own_site_arms,
    paired_scores,
    paired_test,
)


def pooled_scores(runs: Sequence[Run], outside: bool) -> dict[Model, dict[tuple[str, str], float]]:
    """model → scan → its Dice averaged over the runs that scored it (NaN left out); the personal arms
    also as one model each (`own_site_arms`)."""
    own_site = own_site_arms(run_rows(runs))
    values: dict[Model, dict[tuple[str, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for model, scans in paired_scores(run.rows, outside, own_site).items():
            for scan, score in scans.items():
                if not math.isnan(score):
                    values[model][scan].append(score)
    return {model: scan_means(scans) for model, scans in values.items()}


def against_tests(
    runs: Sequence[Run], others: Sequence[Run], outside: bool, pairs: Mapping[str, str] | None = None
) -> tuple[list[PairedTest], list[Model]]:
    """Each model of `runs` that `others` also has: its pooled scans in `runs` against those in `others`
    (difference = runs − others); then, for each `pairs` entry (our arm → their arm), each model of our
    arm against their arm's model of the same training data. Models that score every scan alike on both
    sides (an arm one configuration copied from the other) are returned apart, not tested: they would only
    dilute the q values."""
    ours, theirs = pooled_scores(runs, outside), pooled_scores(others, outside)
    models = compared_models(run_rows(runs))
    partners = [(m, m) for m in models]
    partners += [(m, (pairs[m[0]], m[1])) for m in models if pairs and m[0] in pairs]
    common = [(m, ref) for m, ref in partners if m in ours and ref in theirs]
    same = [m for m, ref in common if m == ref and ours[m] == theirs[ref]]
    tests = [paired_test(m, ref, ours[m], theirs[ref]) for m, ref in common if not (m == ref and m in same)]
    return adjusted(tests), same


def check_pairs(runs: Sequence[Run], others: Sequence[Run], pairs: Mapping[str, str]) -> None:
    """CasesError unless each pair names an arm of each configuration."""
    for side, side_runs, names in (("first", runs, pairs.keys()), ("second", others, pairs.values())):
        arms = _arms(side_runs)
        for arm in names:
            if arm not in arms:
                listed = ", ".join(a if a.isprintable() else repr(a) for a in sorted(arms))  # one line
                raise CasesError(f"--pair: the {side} configuration has no arm {arm!r}; it has {listed}")


def _arms(runs: Sequence[Run]) -> set[str]:
    return {row.arm for row in run_rows(runs)}


def cross_reference_tests(runs: Sequence[Run], others: Sequence[Run]) -> list[PairedTest]:
    """Each shared and personal model of `runs` (the COMPARED_KINDS but centralized; personal arms also as
    one model) against the centralized model of `others`, on the internal scans both scored (pooled as in
    `pooled_scores`): how one configuration's models stand against the other configuration's pooled model.
    Empty when `others` has no centralized model."""
    ours, theirs = pooled_scores(runs, outside=False), pooled_scores(others, outside=False)
    compared, references = _cross_compared(runs), _centralized(others)
    pairs = [(m, ref) for m in compared for ref in references if m in ours and ref in theirs]
    places = KeyPlaces(ours)
    return adjusted([paired_test(m, ref, ours[m], theirs[ref], places.of(m)) for m, ref in pairs])


def _cross_compared(runs: Sequence[Run]) -> list[Model]:
    """The models of `runs` that `cross_reference_tests` pairs with the other configuration's centralized ones."""
    rows = run_rows(runs)
    kinds = model_kinds(rows)
    return [m for m in compared_models(rows) if kinds[m] in COMPARED_KINDS and kinds[m] != CENTRAL]


def _centralized(runs: Sequence[Run]) -> list[Model]:
    kinds = model_kinds(run_rows(runs))
    return [m for m, kind in kinds.items() if kind == CENTRAL]


def build_against_report(
    results_dirs: Sequence[str | Path],
    against: Sequence[str | Path],
    out_dir: str | Path,
    pairs: Mapping[str, str] | None = None,
) -> Path:
    """Write report.md comparing the runs of `results_dirs` with those of `against` into `out_dir`; return it.
    `pairs` (our arm → their arm) adds the pairings of differently named arms (`against_tests`)."""
    out = Path(out_dir)
    if any(out.resolve() == Path(d).resolve() for d in [*results_dirs, *against]):
        raise CasesError(f"--out {out} is one of the results folders; give the comparison a folder of its own")
    if not results_dirs or not against:
        raise CasesError("a comparison needs results folders on both sides of --against")
    if both := {Path(d).resolve() for d in results_dirs} & {Path(d).resolve() for d in against}:
        raise CasesError(f"results folder {min(both)} is on both sides of --against")
    runs, others = read_runs(results_dirs, minimum=1), read_runs(against, minimum=1)  # each side: distinct names
    ours, theirs = read_structures(Path(results_dirs[0]) / CASES), read_structures(Path(against[0]) / CASES)
    if ours != theirs:
        raise CasesError(
            f"{Path(results_dirs[0]) / CASES} scores {list(ours)}, {Path(against[0]) / CASES} scores {list(theirs)}; "
            "compared configurations must score the same structures"
        )
    pairs = dict(pairs or {})
    check_pairs(runs, others, pairs)
    first, second = _side(runs), _side(others)
    rows = run_rows([*runs, *others])
    source = ", ".join(str(Path(d) / CASES) for d in [*results_dirs, *against])
    for side_runs, other_runs in ((runs, others), (others, runs)):  # `cross_reference_tests`, both ways
        check_pair_count(len(_cross_compared(side_runs)), len(_centralized(other_runs)), CENTRAL, source)
    sections = [
        f"# Comparison: {first} against {second}",
        f"- {first}: {', '.join(r.name for r in runs)}\n- {second}: {', '.join(r.name for r in others)}",
        "Every model both configurations trained (same arm, same training data) is paired with itself on the "
        "same scans. Within a configuration a scan's Dice is averaged over its runs that tested the scan, so "
        "each scan is one case; difference = the first configuration − the second."
        + "".join(f" Also paired: {ours} against {theirs} (--pair)." for ours, theirs in pairs.items()),
        "## Internal Dice, % of each run's centralized model (mean over the runs)",
        _percent_table(runs, others, first, second, pairs),
        "## Paired tests, internal test cases",
        _tests_table(against_tests(runs, others, outside=False, pairs=pairs), rows),
    ]
    for side, side_runs, other, other_runs in ((first, runs, second, others), (second, others, first, runs)):
        if _centralized(other_runs):
            sections += [
                f"## Paired tests, internal test cases: {side}'s models against {other}'s centralized model",
                paired_markdown(cross_reference_tests(side_runs, other_runs), rows, CENTRAL),
            ]
    if any(row.outside for row in rows):
        outside = _tests_table(against_tests(runs, others, True, pairs), rows)
        sections += ["## Paired tests, outside institution", outside]
    labelled = [(run.name, Path(d), run.rows) for run, d in zip(runs, results_dirs, strict=True)]
    labelled += [(f"{run.name} (against)", Path(d), run.rows) for run, d in zip(others, against, strict=True)]
    sections += ["## Software", software_section(labelled)]
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT
    path.write_text("\n\n".join(sections) + "\n")
    return path


def _side(runs: Sequence[Run]) -> str:
    return runs[0].name + (f" (+{len(runs) - 1} runs)" if len(runs) > 1 else "")


def _percent_table(
    runs: Sequence[Run], others: Sequence[Run], first: str, second: str, pairs: Mapping[str, str]
) -> str:
    """Each arm both sides trained, then each --pair (our arm against theirs): mean % of centralized; a run
    without a centralized model counts against the other side's (`with_centralized_of`)."""
    ours_runs, theirs_runs = with_centralized_of(runs, others), with_centralized_of(others, runs)
    ours = {s.arm: s.mean_percent for s in seed_summaries(ours_runs)}
    theirs = {s.arm: s.mean_percent for s in seed_summaries(theirs_runs)}
    trained = _arms(runs) & _arms(others)  # not a centralized arm one side only borrowed
    rows = [(arm, arm, arm) for arm in ours if arm in theirs and arm in trained]
    rows += [(f"{a} against {b}", a, b) for a, b in pairs.items() if a in ours and b in theirs]
    table = markdown_table(
        ["arm", first, second],
        [[label, format_number(ours[a], "{:.1f} %"), format_number(theirs[b], "{:.1f} %")] for label, a, b in rows],
    )
    borrowed = [run.name for run, kept in zip([*runs, *others], [*ours_runs, *theirs_runs], strict=True) if run != kept]
    if borrowed:
        table += (
            f"\n\nWithout a centralized model of their own, {', '.join(borrowed)} count against the other "
            "configuration's, from its run that tested the same internal scans (the same split)."
        )
    return table


def with_centralized_of(runs: Sequence[Run], others: Sequence[Run]) -> list[Run]:
    """`runs`, each run without a centralized model given the centralized rows of the run of `others` that
    tested exactly its internal scans (the same sites, split and seed): a configuration that trained only
    a new federated arm gets its % of the centralized model the other configuration trained on that split.
    A run with no such partner is left as it is."""
    out = []
    candidates: list[tuple[Run, frozenset[tuple[str, str]]]] | None = None  # others with a centralized model
    for run in runs:
        partner = None
        if not _centralized([run]):
            if candidates is None:  # each of `others` read once, not once per run
                candidates = [(o, _internal_scans(o)) for o in others if _centralized([o])]
            scans = _internal_scans(run)
            partner = next((o for o, theirs in candidates if theirs == scans), None)
        central = [] if partner is None else [row for row in partner.rows if row.kind == CENTRAL]
        out.append(Run(run.name, [*run.rows, *central]) if central else run)
    return out


def _internal_scans(run: Run) -> frozenset[tuple[str, str]]:
    return frozenset((row.tested_on, row.subject) for row in run.rows if not row.outside)


def _tests_table(compared: tuple[list[PairedTest], list[Model]], rows: Sequence[CaseRow]) -> str:
    tests, same = compared
    label = model_labeller(rows)
    alike = ", ".join(label(m) for m in same)
    note = f"\n\nThe same on both sides (every scan's Dice equal; not tested): {alike}." if same else ""
    if not tests:
        reason = (
            "every model both trained scores alike" if same else "the configurations share no model with such cases"
        )
        return f"Nothing to pair: {reason}." + note
    header = ["model", "n", "mean difference", "P (Wilcoxon)", "P (paired t)", "q (Wilcoxon)", "q (paired t)"]
    return markdown_table(header, [[_pair_label(t, label), *paired_cells(t, "{:+.4f}")] for t in tests]) + note


def _pair_label(test: PairedTest, label: Callable[[Model], str]) -> str:
    """The model's name, and its partner's when they differ (--pair)."""
    name = label(test.model)
    return name if test.reference == test.model else f"{name} against {label(test.reference)}"
