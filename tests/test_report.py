"""The report from a hand-made cases.csv: matrix, means, sd, % of centralized and P values."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
from pathlib import Path

import pytest
from scipy import stats

from fedseg.report import build_report
from fedseg.report.cases import CaseRow, CasesError, read_cases, write_cases
from fedseg.report.layout import ArmInfo
from fedseg.report.tables import arm_summaries, bootstrap_ci, cross_site_matrix, fdr_adjusted, paired_tests

SITE0, SITE1 = ("a", "b", "c"), ("d", "e", "f")
# per-case scores by model and test set (fedavg's first case has classes 0.7 and 0.9 → 0.8)
SCORES = {
    ("private", "site-0", "private"): {"site-0": [0.75, 0.82, 0.61], "site-1": [0.32, 0.41, 0.55]},
    ("private", "site-1", "private"): {"site-0": [0.85, 0.60, 0.72], "site-1": [0.66, 0.74, 0.69]},
    ("centralized", "pooled", "centralized"): {"site-0": [0.90, 0.95, 0.85], "site-1": [0.80, 0.90, 0.85]},
    ("fedavg", "federation", "federated"): {"site-0": [0.80, 0.90, 0.70], "site-1": [0.60, 0.70, 0.80]},
}
OUTSIDE = {"fedavg": [0.5, 0.7], "centralized": [0.6, 0.6]}


def _rows() -> list[CaseRow]:
    rows = []
    for (arm, trained_on, kind), by_site in SCORES.items():
        for site, subjects in (("site-0", SITE0), ("site-1", SITE1)):
            for subject, score in zip(subjects, by_site[site], strict=True):
                dice = (0.7, 0.9) if (arm, site, subject) == ("fedavg", "site-0", "a") else (score, score)
                rows.append(CaseRow(arm, kind, trained_on, site, False, subject, dice))
        if arm in OUTSIDE:
            for subject, score in zip(("o1", "o2"), OUTSIDE[arm], strict=True):
                rows.append(CaseRow(arm, kind, trained_on, "outside", True, subject, (score, math.nan)))
    return rows


@pytest.fixture()
def cases_csv(tmp_path: Path) -> Path:
    write_cases(tmp_path / "cases.csv", _rows())
    return tmp_path / "cases.csv"


def test_csv_round_trip_keeps_values_and_missing_classes(cases_csv: Path) -> None:
    rows = read_cases(cases_csv)
    assert rows == _rows()  # the missing class reads back as math.nan, the very object written
    outside = [r for r in rows if r.outside]
    assert [r.score for r in outside if r.arm == "fedavg"] == [0.5, 0.7]


def test_cross_site_matrix_means_and_sd(cases_csv: Path) -> None:
    matrix = cross_site_matrix(read_cases(cases_csv))
    fed = matrix[("fedavg", "federation")]
    assert fed["site-0"].mean == pytest.approx(0.8) and fed["site-0"].sd == pytest.approx(0.1)
    assert fed["site-1"].n == 3 and fed["site-1"].sd == pytest.approx(0.1)
    assert fed["outside"].mean == pytest.approx(0.6) and fed["outside"].sd == pytest.approx(math.sqrt(0.02))
    cell = matrix[("private", "site-0")]["site-1"]
    assert cell.mean == pytest.approx(statistics.mean([0.32, 0.41, 0.55]))
    assert cell.sd == pytest.approx(statistics.stdev([0.32, 0.41, 0.55]))
    assert "outside" not in matrix[("private", "site-1")]


def test_arm_means_and_percent_of_centralized(cases_csv: Path) -> None:
    summaries = {s.arm: s for s in arm_summaries(read_cases(cases_csv))}
    assert summaries["centralized"].internal.mean == pytest.approx(0.875)
    assert summaries["fedavg"].internal.mean == pytest.approx(0.75)
    assert summaries["fedavg"].internal.sd == pytest.approx(statistics.stdev([0.8, 0.9, 0.7, 0.6, 0.7, 0.8]))
    assert summaries["fedavg"].percent_of_centralized == pytest.approx(100 * 0.75 / 0.875)
    assert summaries["private"].internal.n == 12
    assert math.isnan(summaries["private"].outside.mean)


def test_paired_tests_have_hand_computed_p_values(cases_csv: Path) -> None:
    tests = {(t.model, t.reference): t for t in paired_tests(read_cases(cases_csv))}
    assert len(tests) == 4  # fedavg and centralized, each against two private models
    # fedavg beats private site-0 on all 6 cases with distinct gaps: exact two-sided P = 2 / 2^6
    better = tests[(("fedavg", "federation"), ("private", "site-0"))]
    assert better.n == 6 and better.p_wilcoxon == pytest.approx(2 / 64)
    gaps = [0.05, 0.08, 0.09, 0.28, 0.29, 0.25]
    assert better.mean_difference == pytest.approx(statistics.mean(gaps))
    t = statistics.mean(gaps) / (statistics.stdev(gaps) / math.sqrt(6))
    assert better.p_ttest == pytest.approx(2 * stats.t.sf(t, df=5))
    # against private site-1 the signed ranks split 11 : 10 — exact two-sided P = 1
    mixed = tests[(("fedavg", "federation"), ("private", "site-1"))]
    assert mixed.p_wilcoxon == pytest.approx(1.0)
    # Benjamini–Hochberg over the 4 tests: q_(i) = min over j >= i of p_(j) · 4 / j (p sorted ascending)
    for kind in ("wilcoxon", "ttest"):
        ps = sorted(getattr(t, f"p_{kind}") for t in tests.values())
        expected = [min(p * 4 / j for j, p in enumerate(ps, start=1) if j >= i) for i in range(1, 5)]
        assert sorted(getattr(t, f"q_{kind}") for t in tests.values()) == pytest.approx(expected)


def test_paired_tests_against_the_centralized_model(cases_csv: Path) -> None:
    (test,) = paired_tests(read_cases(cases_csv), "centralized")  # fedavg only: private arms are not compared
    assert (test.model, test.reference) == (("fedavg", "federation"), ("centralized", "pooled"))
    gaps = [-0.10, -0.05, -0.15, -0.20, -0.20, -0.05]  # fedavg − centralized, case by case
    assert test.n == 6 and test.mean_difference == pytest.approx(statistics.mean(gaps))
    assert test.p_wilcoxon == pytest.approx(stats.wilcoxon(gaps).pvalue)
    assert test.p_ttest == pytest.approx(stats.ttest_1samp(gaps, 0.0).pvalue)


def test_false_discovery_rate_adjustment_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04 (m = 3): 0.04·3/3 = 0.04; 0.03·3/2 = 0.045 → 0.04 (monotone); 0.01·3/1 = 0.03
    adjusted = fdr_adjusted([0.01, 0.04, math.nan, 0.03])
    assert adjusted[:2] + adjusted[3:] == pytest.approx([0.03, 0.04, 0.04]) and math.isnan(adjusted[2])
    assert fdr_adjusted([0.2]) == [0.2] and fdr_adjusted([]) == []


def test_bootstrap_interval_of_the_mean_by_hand() -> None:
    # two cases 0 and 1: a resample's mean is 0, 0.5 or 1 with P 1/4, 1/2, 1/4 → the 2.5 % and 97.5 % points are 0, 1
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)
    # cases 0, 0, 0, 1: the mean is k/4 with k ~ Binomial(4, 1/4): P(k = 0) = 0.32 > 2.5 %, P(k <= 2) = 0.95 < 97.5 %
    # <= P(k <= 3) = 0.996 → (0, 0.75)
    assert bootstrap_ci([0.0, 0.0, 0.0, 1.0, math.nan]) == (0.0, 0.75)
    assert bootstrap_ci([0.6, 0.6, 0.6]) == (0.6, 0.6)
    assert all(math.isnan(b) for b in bootstrap_ci([0.6]))


def test_report_markdown_and_plots(cases_csv: Path, tmp_path: Path) -> None:
    arm_dir = tmp_path / "arms" / "fedavg--federation"
    arm_dir.mkdir(parents=True)
    ArmInfo("fedavg", "federated", "federation", model_bytes=1_000_000, sites=2, seconds=3.0).save(arm_dir)
    rounds = [
        {"round": r, "mean_dice": 0.2 * r, "seconds": 1.0, "train": {"site-0": {}, "site-1": {}}} for r in range(3)
    ]
    (arm_dir / "history.json").write_text(json.dumps({"rounds": rounds}))
    report = build_report(tmp_path, tmp_path / "out").read_text()
    assert "| fedavg | 0.800 ± 0.100 (3) | 0.700 ± 0.100 (3) | 0.600 ± 0.141 (2) |" in report
    low, high = bootstrap_ci([0.8, 0.9, 0.7, 0.6, 0.7, 0.8])
    assert 0.6 < low < 0.75 < high < 0.9
    assert f"| fedavg | federated | 0.750 ± 0.105 (6) | {low:.3f}–{high:.3f} | 0.600 ± 0.141 (2) | 85.7 % |" in report
    assert "| fedavg | private (site-0) | 6 | +0.173 | 0.0312 |" in report
    assert "## Paired tests against the centralized model" in report
    assert "| fedavg | centralized | 6 | -0.125 |" in report
    for name in ("heatmap.png", "boxes.png", "dice_vs_round.png", "dice_vs_cost.png"):
        assert (tmp_path / "out" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert "overlays.png" not in report


def test_malformed_cases_file_names_file_and_problem(tmp_path: Path) -> None:
    path = tmp_path / "cases.csv"
    path.write_text("arm,trained_on,subject,dice_1\nfedavg,federation,a,0.5\n")
    with pytest.raises(CasesError, match=r"cases.csv: header lacks \['kind', 'tested_on', 'outside'\]"):
        read_cases(path)
    header = "arm,kind,trained_on,tested_on,outside,subject,dice_1\n"
    for bad in ("-5", "1e400", "inf", "1.0000001"):  # silent garbage in every mean otherwise
        path.write_text(header + f"fedavg,federated,federation,site-0,0,a,{bad}\n")
        with pytest.raises(CasesError, match=r"cases.csv, line 2: malformed row .*: a Dice value outside \[0, 1\]"):
            read_cases(path)


@pytest.mark.parametrize(
    ("column", "value"), [("arm", "fed\navg"), ("subject", "a\tb"), ("tested_on", "site\r0"), ("kind", "x\x00")]
)
def test_a_name_with_a_line_break_or_control_character_is_refused(tmp_path: Path, column: str, value: str) -> None:
    row = dict(arm="fedavg", kind="federated", trained_on="federation", tested_on="site-0", subject="a")
    row[column] = value
    path = tmp_path / "cases.csv"
    write_cases(path, [CaseRow(**row, outside=False, dice=(0.5,))])
    with pytest.raises(CasesError, match=rf"cases.csv, line 2: .*: {column} .* has a line break or other non-print"):
        read_cases(path)


def test_a_pipe_in_an_arm_name_stays_one_table_cell(tmp_path: Path) -> None:
    rows = [dataclasses.replace(r, arm="fed|avg") if r.arm == "fedavg" else r for r in _rows()]
    write_cases(tmp_path / "cases.csv", rows)
    report = build_report(tmp_path, tmp_path / "out").read_text()
    assert "| fed\\|avg | federated | 0.750 ± 0.105 (6) |" in report
    for line in report.splitlines():
        if line.startswith("| fed"):  # as many cells as the header: each row's unescaped pipes
            assert len(re.findall(r"(?<!\\)\|", line)) == len(re.findall(r"(?<!\\)\|", _header_of(report, line)))


def _header_of(report: str, row: str) -> str:
    """The header line of the table holding `row`."""
    lines = report.splitlines()
    index = lines.index(row)
    while index > 0 and lines[index - 1].startswith("|"):
        index -= 1
    return lines[index]


def test_paired_tests_on_the_outside_institution(tmp_path: Path) -> None:
    outside = {"private": [0.40, 0.50, 0.30], "fedavg": [0.55, 0.70, 0.36]}  # fedavg − private: 0.15, 0.20, 0.06
    rows = [
        CaseRow(arm, kind, trained_on, "outside", True, subject, (score, score))
        for arm, kind, trained_on in (("private", "private", "site-1"), ("fedavg", "federated", "federation"))
        for subject, score in zip(("o1", "o2", "o3"), outside[arm], strict=True)
    ]
    rows.append(CaseRow("private", "private", "site-0", "site-0", False, "a", (0.8, 0.8)))  # no outside case
    write_cases(tmp_path / "cases.csv", rows)
    (test,) = paired_tests(read_cases(tmp_path / "cases.csv"), outside=True)
    assert (test.model, test.reference) == (("fedavg", "federation"), ("private", "site-1"))
    assert test.n == 3 and test.mean_difference == pytest.approx((0.15 + 0.20 + 0.06) / 3)
    assert test.p_wilcoxon == pytest.approx(2 / 8)  # all three gaps positive: exact two-sided P = 2 / 2^3
    assert "| fedavg | private (site-1) | 3 | +0.137 | 0.25 |" in build_report(tmp_path).read_text()


@pytest.mark.parametrize(
    ("arm_json", "history", "fault"),
    [
        ({"software": {}}, {"rounds": []}, "arm.json: not an arm record (TypeError)"),
        ({"arm": "fedavg", "trained_on": "federation", "kind": "federated", "model_bytes": 1, "sites": 2,
          "seconds": 1.0}, {"rounds": [{"round": 0}]}, "history.json: not a run history (KeyError)"),
    ],
)  # fmt: skip
def test_a_broken_arm_folder_is_a_one_line_error_naming_the_file(
    cases_csv: Path, tmp_path: Path, arm_json: dict, history: dict, fault: str
) -> None:
    arm_dir = tmp_path / "arms" / "fedavg--federation"
    arm_dir.mkdir(parents=True)
    (arm_dir / "arm.json").write_text(json.dumps(arm_json))
    (arm_dir / "history.json").write_text(json.dumps(history))
    with pytest.raises(CasesError, match=re.escape(f"fedavg--federation/{fault}") + "$"):
        build_report(tmp_path, tmp_path / "out")
