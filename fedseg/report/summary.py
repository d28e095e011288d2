"""`fedseg report RESULTS_DIR`: report.md with the tables and PNG plots of one experiment; with several
results folders (one study at other seeds), report.md summarising them (`build_seed_report`)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedseg.report import plots
from fedseg.report.cases import CLIENT_LEVEL, SAMPLE_LEVEL, CaseRow, CasesError, read_cases, read_structures
from fedseg.report.layout import CASES
from fedseg.report.seeds import (
    ModelOutside,
    Run,
    SeedSummary,
    outside_by_model,
    pooled_tests,
    read_runs,
    run_rows,
    seed_summaries,
)
from fedseg.report.software import software_section
from fedseg.report.tables import (
    BOOTSTRAP_RESAMPLES,
    CENTRAL,
    CI_LEVEL,
    ArmSummary,
    Cell,
    Model,
    PairedTest,
    StructureSummary,
    arm_summaries,
    by_arm,
    check_paired_tests,
    cross_site_matrix,
    model_labeller,
    models,
    paired_tests,
    privacy_points,
    privacy_references,
    structure_cell,
    structure_summaries,
    structure_summary,
    test_sets,
)

REPORT = "report.md"
CURVE_KINDS = ("federated", "cyclic")  # arms drawn in the Dice-vs-round and cost plots
PROTECTS = {  # what ε bounds, in plain words, per DP kind
    SAMPLE_LEVEL: "one subject's scans at a site: whether any single subject was in a site's training data",
    CLIENT_LEVEL: "a whole site's participation: whether any one site, with all its subjects, took part",
}


def build_report(results_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.md and the plots into `out_dir` (default: the results folder); return report.md."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = read_cases(results_dir / CASES)
    check_paired_tests(rows, str(results_dir / CASES))
    structures = read_structures(results_dir / CASES)
    matrix, summaries = cross_site_matrix(rows), arm_summaries(rows)  # each once: a cell and a bootstrap each
    sections = [
        f"# Experiment report: {results_dir.resolve().name}",
        f"From `{CASES}`: {len(rows)} rows, {len(models(rows))} models, {len(test_sets(rows))} test sets. "
        f"A case's Dice is the mean over the scored structures ({', '.join(structures)}); cells are mean ± sd "
        "(n cases).",
        "## Cross-site Dice (trained on × tested on)",
        matrix_table(rows, matrix),
        "## Arms",
        arms_table(rows, summaries),
        *(["## Dice per structure", structure_table(rows, structures)] if len(structures) > 1 else []),
        "## Paired tests against each private model (same internal test cases)",
        paired_table(rows, "private"),
        *(
            ["## Paired tests against the centralized model (same internal test cases)", paired_table(rows, CENTRAL)]
            if any(row.kind == CENTRAL for row in rows)
            else []
        ),
        *(
            [
                "## Paired tests against each private model on the outside institution",
                paired_table(rows, "private", outside=True),
            ]
            if any(row.outside for row in rows)
            else []
        ),
        *(["## Privacy: Dice vs ε", privacy_table(rows)] if privacy_points(rows) else []),
        "## Plots",
        _plots(results_dir, out, rows, matrix, summaries),
        "## Software",
        software_section([(results_dir.resolve().name, results_dir, rows)]),
    ]
    path = out / REPORT
    path.write_text("\n\n".join(sections) + "\n")
    return path


def build_seed_report(results_dirs: Sequence[str | Path], out_dir: str | Path) -> Path:
    """Write report.md summarising one study's runs at several seeds into `out_dir` (not one of the runs'
    folders: their own report.md stays); return its path."""
    out = Path(out_dir)
    if any(out.resolve() == Path(d).resolve() for d in results_dirs):
        raise CasesError(f"--out {out} is one of the results folders; give the summary a folder of its own")
    runs = read_runs(results_dirs)
    rows = run_rows(runs)  # for the models' labels and which sections apply
    check_paired_tests(rows, ", ".join(str(Path(d) / CASES) for d in results_dirs))
    names = [run.name for run in runs]
    summaries = seed_summaries(runs)
    pooled = (
        "Pooled over the runs, each scan is one case: its Dice under either model averaged over the runs that "
        "tested both on it (a scan is a test case in several runs: the outside institution's in all)."
    )
    sections = [
        f"# Seeds report: {', '.join(names)}",
        f"{len(runs)} runs of one study (another split, initial model and draws each), from their `{CASES}`. "
        "Per run, an arm's internal Dice (mean over its test cases) as % of that run's centralized model "
        "(– where the run lacks the arm or a centralized model); the mean is over the runs with a value.",
        "## Internal Dice, % of centralized",
        _per_run_table(names, [(s, s.percent, s.mean_percent) for s in summaries], "{:.1f} %"),
    ]
    outside = any(row.outside for row in rows)
    if outside:
        sections += [
            "## Outside institution, mean Dice",
            _per_run_table(names, [(s, s.outside, s.mean_outside) for s in summaries], "{:.3f}"),
            "## Outside institution, each model",
            "Each model's mean outside Dice per run and over the runs; last column: the runs in which it is the "
            "best model outside.",
            _outside_models_table(names, outside_by_model(runs), rows),
        ]
    structures = read_structures(Path(results_dirs[0]) / CASES)  # read_runs: every run scores the same ones
    if len(structures) > 1:
        sections += [
            "## Dice per structure over the runs",
            "Every run's test cases together (a scan tested in several runs counts in each), each arm over the "
            "runs that have it and as % of the centralized model of those runs.",
            pooled_structure_table(runs, structures),
        ]
    if any(row.kind == CENTRAL for row in rows):
        sections += [
            "## Paired tests against the centralized model over the runs (internal test cases)",
            pooled,
            paired_markdown(pooled_tests(runs, CENTRAL), rows, CENTRAL),
        ]
    if outside:
        sections += [
            "## Paired tests against each private model on the outside institution over the runs",
            pooled,
            paired_markdown(pooled_tests(runs, "private", outside=True), rows, "private", outside=True),
        ]
    sections += [
        "## Software",
        software_section([(run.name, Path(d), run.rows) for run, d in zip(runs, results_dirs, strict=True)]),
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT
    path.write_text("\n\n".join(sections) + "\n")
    return path


def _per_run_table(names: Sequence[str], values: Sequence[tuple[SeedSummary, Sequence[float], float]], fmt: str) -> str:
    """One row per arm: its value in each run, then their mean; "–" where NaN."""
    return markdown_table(
        ["arm", "kind", *names, "mean"],
        [
            [s.arm, s.kind, *(format_number(v, fmt) for v in per_run), format_number(mean, fmt)]
            for s, per_run, mean in values
        ],
    )


def _outside_models_table(names: Sequence[str], models: Sequence[ModelOutside], rows: Sequence[CaseRow]) -> str:
    label = model_labeller(rows)
    return markdown_table(
        ["model", *names, "mean", "best in"],
        [
            [
                label(m.model),
                *(format_number(v, "{:.3f}") for v in m.outside),
                format_number(m.mean, "{:.3f}"),
                f"{m.best} of {len(names)}",
            ]
            for m in models
        ],
    )


def matrix_table(rows: Sequence[CaseRow], matrix: Mapping[Model, Mapping[str, Cell]] | None = None) -> str:
    """Markdown cross-site matrix (`cross_site_matrix`, unless given); outside institutions are marked with a
    star."""
    matrix, columns = cross_site_matrix(rows) if matrix is None else matrix, test_sets(rows)
    outside = {r.tested_on for r in rows if r.outside}
    header = ["model", *(f"{c}*" if c in outside else c for c in columns)]
    label = model_labeller(rows)
    body = [[label(m), *(_cell(matrix[m].get(c)) for c in columns)] for m in models(rows)]
    note = "\n\n\\* outside institution (never trained on)." if outside else ""
    return markdown_table(header, body) + note


def arms_table(rows: Sequence[CaseRow], summaries: Sequence[ArmSummary] | None = None) -> str:
    """Markdown table of the `arm_summaries` (unless given)."""
    header = ["arm", "kind", "internal test sets", f"{CI_LEVEL:.0%} CI of the mean", "outside", "% of centralized"]
    body = [
        [
            s.arm,
            s.kind,
            _cell(s.internal),
            _interval(s.internal_ci),
            _cell(s.outside),
            format_number(s.percent_of_centralized, "{:.1f} %"),
        ]
        for s in (arm_summaries(rows) if summaries is None else summaries)
    ]
    return markdown_table(header, body) + (
        f"\n\nCI: percentile bootstrap of the mean internal-test Dice ({BOOTSTRAP_RESAMPLES} resamples of the "
        "arm's cases, seeded)."
    )


def structure_table(rows: Sequence[CaseRow], structures: Sequence[str]) -> str:
    """Per arm, each structure's internal Dice with % of centralized, and its outside Dice."""
    summaries = {(s.arm, s.structure): s for s in structure_summaries(rows, structures)}
    return _structure_markdown(list(dict.fromkeys(r.arm for r in rows)), summaries, structures)


def pooled_structure_table(runs: Sequence[Run], structures: Sequence[str]) -> str:
    """`structure_table` over several runs' test cases together, each arm over the runs that have it
    (its % of the centralized model of those runs)."""
    groups = [by_arm(run.rows) for run in runs]  # one pass over each run's rows, not one per arm
    central_rows = [by_arm(r for r in run.rows if r.kind == CENTRAL) for run in runs]
    arms = list(dict.fromkeys(arm for by_run in groups for arm in by_run))
    references: dict[tuple[tuple[int, ...], str, int], float] = {}  # (runs, centralized arm, structure) → Dice
    summaries: dict[tuple[str, str], StructureSummary] = {}
    for arm in arms:
        having = tuple(i for i, by_run in enumerate(groups) if arm in by_run)
        own = [row for i in having for row in groups[i][arm]]
        central = next((next(iter(central_rows[i])) for i in having if central_rows[i]), None)  # first seen
        for index, structure in enumerate(structures):
            if central is None:
                reference = math.nan
            elif central == arm:
                reference = structure_cell(own, index, False).mean
            else:  # the first centralized arm's centralized rows in the runs that have `arm`
                key = (having, central, index)
                if key not in references:
                    rows = [row for i in having for row in central_rows[i].get(central, [])]
                    references[key] = structure_cell(rows, index, False).mean
                reference = references[key]
            summaries[(arm, structure)] = structure_summary(arm, structure, index, own, reference)
    return _structure_markdown(arms, summaries, structures)


def _structure_markdown(
    arms: Sequence[str], summaries: Mapping[tuple[str, str], StructureSummary], structures: Sequence[str]
) -> str:
    header = [
        "arm",
        *(f"{name} internal (% of centralized)" for name in structures),
        *(f"{name} outside" for name in structures),
    ]
    body = []
    for arm in arms:
        cells = [summaries[(arm, name)] for name in structures]
        body.append(
            [
                arm,
                *(
                    f"{c.internal.mean:.3f} ({format_number(c.percent_of_centralized, '{:.1f} %')})"
                    if c.internal.n
                    else "–"
                    for c in cells
                ),
                *(_cell(c.outside) for c in cells),
            ]
        )
    return markdown_table(header, body)


def paired_table(rows: Sequence[CaseRow], reference_kind: str, *, outside: bool = False) -> str:
    return paired_markdown(paired_tests(rows, reference_kind, outside=outside), rows, reference_kind, outside=outside)


def paired_cells(test: PairedTest, difference_format: str) -> list[str]:
    """n, mean difference, P and q values of a paired test, as table cells."""
    return [
        str(test.n),
        format_number(test.mean_difference, difference_format),
        *(format_number(p, "{:.3g}") for p in (test.p_wilcoxon, test.p_ttest, test.q_wilcoxon, test.q_ttest)),
    ]


def paired_markdown(
    tests: Sequence[PairedTest], rows: Sequence[CaseRow], reference_kind: str, *, outside: bool = False
) -> str:
    """The tests as a markdown table, models labelled as in `rows`."""
    if not tests:
        return f"No {reference_kind} arm, or no arm to compare with it{' outside' if outside else ''}: nothing to pair."
    header = [
        "model",
        f"vs {reference_kind}",
        "n",
        "mean difference",
        "P (Wilcoxon)",
        "P (paired t)",
        "q (Wilcoxon)",
        "q (paired t)",
    ]
    label = model_labeller(rows)
    body = [[label(t.model), label(t.reference), *paired_cells(t, "{:+.3f}")] for t in tests]
    return markdown_table(header, body) + (
        f"\n\nTwo-sided tests on per-case Dice; difference = model − {reference_kind} model. q: the P value adjusted "
        f"for the {len(tests)} comparisons of this table (Benjamini–Hochberg false discovery rate, "
        "scipy.stats.false_discovery_control); a difference is significant at false discovery rate α when q < α."
    )


def privacy_table(rows: Sequence[CaseRow]) -> str:
    """Each DP model's final ε and δ, internal-test Dice and what its ε protects; then the no-DP references."""
    references = privacy_references(rows)
    kinds = {row.model: row.kind for row in rows}
    federated = [cell for m, cell in references.items() if kinds[m] == "federated"]
    baseline = federated[0].mean if federated else math.nan

    def share(cell: Cell) -> str:
        return f"{100 * cell.mean / baseline:.0f} %" if baseline > 0 else "–"

    header = ["model", "DP", "ε", "δ", "internal test Dice", "% of non-DP federated", "ε protects"]
    label = model_labeller(rows)
    body = [
        [
            label(p.model),
            p.dp_kind,
            format_number(p.epsilon, "{:.2f}"),
            format_number(p.delta, "{:g}"),
            _cell(p.internal),
            share(p.internal),
            PROTECTS[p.dp_kind],
        ]
        for p in privacy_points(rows)
    ]
    body += [
        [label(m), "none", "–", "–", _cell(cell), share(cell), "nothing (trained without DP)"]
        for m, cell in references.items()
    ]
    return markdown_table(header, body) + (
        "\n\nSmaller ε is stronger protection: the model changes the odds of telling whether the protected "
        "unit took part by at most a factor e^ε (except with probability δ). A DP-SGD model's ε is the largest "
        "over its sites. % of non-DP federated: internal test Dice relative to the first federated model "
        "trained without DP."
    )


def _plots(
    results_dir: Path,
    out: Path,
    rows: Sequence[CaseRow],
    matrix: dict[Model, dict[str, Cell]],
    summaries: Sequence[ArmSummary],
) -> str:
    made = []
    plots.plot_heatmap(rows, matrix, out / "heatmap.png")
    plots.plot_boxes(rows, out / "boxes.png")
    made += ["heatmap.png", "boxes.png"]
    kinds = {row.model: row.kind for row in rows}
    curves = plots.load_curves(results_dir, {m for m, kind in kinds.items() if kind in CURVE_KINDS})
    if curves:
        central = next((s.internal.mean for s in summaries if s.kind == "centralized"), math.nan)
        plots.plot_rounds(curves, out / "dice_vs_round.png", reference=central)
        plots.plot_cost(curves, out / "dice_vs_cost.png")
        made += ["dice_vs_round.png", "dice_vs_cost.png"]
    points = privacy_points(rows)
    if points:
        label = model_labeller(rows)
        references = {label(m): cell for m, cell in privacy_references(rows).items()}
        plots.plot_privacy(points, references, out / "dice_vs_epsilon.png")
        made.append("dice_vs_epsilon.png")
    if plots.plot_overlays(results_dir, out / "overlays.png"):
        made.append("overlays.png")
    return "\n\n".join(f"![{name[:-4]}]({name})" for name in made)


def _interval(bounds: tuple[float, float]) -> str:
    low, high = bounds
    return "–" if math.isnan(low) or math.isnan(high) else f"{low:.3f}–{high:.3f}"


def _cell(cell: Cell | None) -> str:
    if cell is None or cell.n == 0:
        return "–"
    sd = "" if math.isnan(cell.sd) else f" ± {cell.sd:.3f}"
    return f"{cell.mean:.3f}{sd} ({cell.n})"


def format_number(value: float, fmt: str) -> str:
    return "–" if math.isnan(value) else fmt.format(value)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    """A markdown table; a `|` inside a cell (an arm or site name) is escaped so that it stays one cell."""
    lines = ["| " + " | ".join(_cells(header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in body]
    return "\n".join(lines)


def _cells(row: list[str]) -> list[str]:
    return [cell.replace("|", "\\|") for cell in row]
