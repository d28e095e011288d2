"""The report's privacy part from a hand-made cases.csv: ε columns, Dice-vs-ε numbers, table and plot."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from fedseg.report import build_report
from fedseg.report.cases import CaseRow, CasesError, read_cases, write_cases
from fedseg.report.tables import privacy_points, privacy_references

SUBJECTS = {"site-0": ("a", "b"), "site-1": ("c", "d")}
# (arm, kind, dp_kind, ε, δ) → internal per-case scores in SUBJECTS order; the outside case never counts
MODELS = {
    ("centralized", "centralized", "", math.nan, math.nan): [0.90, 0.80, 0.70, 0.80],
    ("fedavg", "federated", "", math.nan, math.nan): [0.70, 0.60, 0.50, 0.60],
    ("fedavg-dpsgd-z2.0", "federated", "sample-level", 1.25, 1e-5): [0.30, 0.40, 0.20, 0.30],
    ("fedavg-dpsgd-z0.5", "federated", "sample-level", 40.0, 1e-5): [0.60, 0.50, 0.40, 0.50],
    ("dp-noised-z1.0", "federated", "client-level", 3.5, 1e-6): [0.10, 0.20, 0.30, 0.20],
}
TRAINED_ON = {"centralized": "pooled"}


def _rows() -> list[CaseRow]:
    rows = []
    for (arm, kind, dp_kind, epsilon, delta), scores in MODELS.items():
        trained_on = TRAINED_ON.get(arm, "federation")
        cases = [(site, subject) for site, subjects in SUBJECTS.items() for subject in subjects]
        for (site, subject), score in zip(cases, scores, strict=True):
            rows.append(CaseRow(arm, kind, trained_on, site, False, subject, (score,), dp_kind, epsilon, delta))
        rows.append(CaseRow(arm, kind, trained_on, "outside", True, "o", (0.0,), dp_kind, epsilon, delta))
    return rows


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    write_cases(tmp_path / "cases.csv", _rows())
    return tmp_path


def test_privacy_columns_round_trip_and_old_files_read_as_no_dp(results: Path, tmp_path: Path) -> None:
    assert read_cases(results / "cases.csv") == _rows()
    header = (results / "cases.csv").read_text().splitlines()[0]
    assert header == "arm,kind,trained_on,tested_on,outside,subject,dice_1,dp_kind,epsilon,delta"
    old = tmp_path / "old.csv"
    old.write_text("arm,kind,trained_on,tested_on,outside,subject,dice_1\nfedavg,federated,federation,site-0,0,a,0.5\n")
    (row,) = read_cases(old)
    assert row.dp_kind == "" and math.isnan(row.epsilon) and row.dice == (0.5,)


def test_bad_privacy_values_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "cases.csv"
    head = "arm,kind,trained_on,tested_on,outside,subject,dice_1,dp_kind,epsilon,delta\n"
    path.write_text(head + "a,federated,federation,site-0,0,s,0.5,row-level,1.0,1e-5\n")
    with pytest.raises(CasesError, match=r"line 2: .*dp_kind 'row-level' is not one of sample-level, client-level"):
        read_cases(path)
    path.write_text(head + "a,federated,federation,site-0,0,s,0.5,sample-level,,1e-5\n")
    with pytest.raises(CasesError, match="dp_kind and epsilon must be both set or both empty"):
        read_cases(path)


def test_dice_vs_epsilon_points_and_references(results: Path) -> None:
    rows = read_cases(results / "cases.csv")
    points = privacy_points(rows)
    assert [(p.model[0], p.dp_kind, p.epsilon, p.delta) for p in points] == [
        ("dp-noised-z1.0", "client-level", 3.5, 1e-6),
        ("fedavg-dpsgd-z2.0", "sample-level", 1.25, 1e-5),
        ("fedavg-dpsgd-z0.5", "sample-level", 40.0, 1e-5),
    ]
    strong = points[1].internal  # outside case (Dice 0) left out
    assert (strong.mean, strong.n) == (pytest.approx(0.3), 4)
    assert strong.sd == pytest.approx(statistics.stdev([0.3, 0.4, 0.2, 0.3]))
    references = privacy_references(rows)
    assert list(references) == [("centralized", "pooled"), ("fedavg", "federation")]
    assert references[("fedavg", "federation")].mean == pytest.approx(0.6)


def test_report_has_privacy_table_and_dice_vs_epsilon_plot(results: Path, tmp_path: Path) -> None:
    report = build_report(results, tmp_path / "out").read_text()
    section = report.split("## Privacy: Dice vs ε\n\n", 1)[1].split("\n\n## ", 1)[0]
    lines = section.splitlines()
    assert lines[0] == "| model | DP | ε | δ | internal test Dice | % of non-DP federated | ε protects |"
    assert lines[2:7] == [
        "| dp-noised-z1.0 | client-level | 3.50 | 1e-06 | 0.200 ± 0.082 (4) | 33 % | a whole site's participation: "
        "whether any one site, with all its subjects, took part |",
        "| fedavg-dpsgd-z2.0 | sample-level | 1.25 | 1e-05 | 0.300 ± 0.082 (4) | 50 % | one subject's scans at a site: "
        "whether any single subject was in a site's training data |",
        "| fedavg-dpsgd-z0.5 | sample-level | 40.00 | 1e-05 | 0.500 ± 0.082 (4) | 83 % | one subject's scans "
        "at a site: "
        "whether any single subject was in a site's training data |",
        "| centralized | none | – | – | 0.800 ± 0.082 (4) | 133 % | nothing (trained without DP) |",
        "| fedavg | none | – | – | 0.600 ± 0.082 (4) | 100 % | nothing (trained without DP) |",
    ]
    assert "![dice_vs_epsilon](dice_vs_epsilon.png)" in report
    png = (tmp_path / "out" / "dice_vs_epsilon.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


def test_report_without_dp_has_no_privacy_part(tmp_path: Path) -> None:
    write_cases(tmp_path / "cases.csv", [r for r in _rows() if not r.dp_kind])
    report = build_report(tmp_path, tmp_path / "out").read_text()
    assert "Privacy" not in report and not (tmp_path / "out" / "dice_vs_epsilon.png").exists()
