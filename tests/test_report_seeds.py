"""The seeds report from hand-made runs: % of centralized per run and on average, pooled paired tests."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.report import build_seed_report
from fedseg.report.cases import CaseRow, CasesError, write_cases
from fedseg.report.seeds import pooled_rows, read_runs, seed_summaries

# per run: arm → internal scores of subjects s1..s3 at site-0; the second run has no fedprox arm
RUNS = {
    "study": {"centralized": [0.8, 0.9, 1.0], "fedavg": [0.7, 0.9, 0.8], "fedprox": [0.9, 0.9, 0.9]},
    "study-seed1": {"centralized": [0.6, 0.6, 0.6], "fedavg": [0.5, 0.55, 0.45]},
}
KINDS = {"centralized": "centralized", "fedavg": "federated", "fedprox": "federated"}
OUTSIDE = {"study": {"fedavg": 0.3, "centralized": 0.1}, "study-seed1": {"fedavg": 0.5, "centralized": 0.3}}


def _write_runs(root: Path) -> list[Path]:
    folders = []
    for name, arms in RUNS.items():
        rows = []
        for arm, scores in arms.items():
            trained_on = "pooled" if arm == "centralized" else "federation"
            rows += [
                CaseRow(arm, KINDS[arm], trained_on, "site-0", False, f"s{i}", (score, score))
                for i, score in enumerate(scores, start=1)
            ]
            if arm in OUTSIDE[name]:
                rows.append(CaseRow(arm, KINDS[arm], trained_on, "outside", True, "o1", (OUTSIDE[name][arm], math.nan)))
        (root / name).mkdir()
        write_cases(root / name / "cases.csv", rows)
        folders.append(root / name)
    return folders


def test_percent_per_run_and_mean_over_the_runs_that_have_the_arm(tmp_path: Path) -> None:
    summaries = {s.arm: s for s in seed_summaries(read_runs(_write_runs(tmp_path)))}
    assert summaries["fedavg"].percent == pytest.approx((100 * 0.8 / 0.9, 100 * 0.5 / 0.6))
    assert summaries["fedavg"].mean_percent == pytest.approx((100 * 0.8 / 0.9 + 100 * 0.5 / 0.6) / 2)
    assert summaries["fedprox"].percent[0] == pytest.approx(100.0) and math.isnan(summaries["fedprox"].percent[1])
    assert summaries["fedprox"].mean_percent == pytest.approx(100.0)
    assert summaries["fedavg"].outside == pytest.approx((0.3, 0.5))


def test_pooled_pairs_are_the_same_subject_of_the_same_run(tmp_path: Path) -> None:
    rows = pooled_rows(read_runs(_write_runs(tmp_path)))
    fedavg = {r.subject: r.score for r in rows if r.arm == "fedavg" and not r.outside}
    assert fedavg == pytest.approx(
        {
            "study/s1": 0.7,
            "study/s2": 0.9,
            "study/s3": 0.8,
            "study-seed1/s1": 0.5,
            "study-seed1/s2": 0.55,
            "study-seed1/s3": 0.45,
        }
    )


def test_report_has_the_pooled_wilcoxon_p_value(tmp_path: Path) -> None:
    path = build_seed_report(_write_runs(tmp_path), tmp_path / "out")
    text = path.read_text()
    fedavg = [0.7, 0.9, 0.8, 0.5, 0.55, 0.45]
    central = [0.8, 0.9, 1.0, 0.6, 0.6, 0.6]
    p = stats.wilcoxon(fedavg, central).pvalue
    line = next(x for x in text.splitlines() if x.startswith("| fedavg | centralized |"))
    assert f"| 6 | -0.100 | {p:.3g} |" in line
    row = next(x for x in text.splitlines() if x.startswith("| fedavg | federated | 88.9 %"))
    assert row.endswith(f"| {(100 * 0.8 / 0.9 + 100 * 0.5 / 0.6) / 2:.1f} % |")
    assert "| fedprox | federated | 100.0 % | – | 100.0 % |" in text


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    first, second = _write_runs(tmp_path)
    with pytest.raises(CasesError, match="at least two"):
        read_runs([first])
    with pytest.raises(CasesError, match="study is given twice"):
        read_runs([first, first])
    write_cases(second / "cases.csv", [CaseRow("fedavg", "federated", "federation", "site-0", False, "s1", (0.5,))])
    with pytest.raises(CasesError, match="must score the same ones"):
        read_runs([first, second])
    result = CliRunner().invoke(app, ["report", str(first), str(tmp_path / "missing")], catch_exceptions=False)
    assert result.exit_code == 2 and "need --out" in result.output
    result = CliRunner().invoke(
        app, ["report", str(first), str(tmp_path / "missing"), "--out", str(tmp_path / "o")], catch_exceptions=False
    )
    assert result.exit_code == 2 and "missing" in result.output and "Traceback" not in result.output
