"""An arm of per-site models (each site's personal model on its own test set) paired as one model: its
every case against the centralized model, in one run, pooled over runs, and across two configurations."""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path

import pytest
from scipy import stats

from fedseg.report import build_against_report, build_report, build_seed_report
from fedseg.report.against import against_tests, cross_reference_tests
from fedseg.report.cases import CaseRow, write_cases
from fedseg.report.seeds import pooled_tests, read_runs
from fedseg.report.tables import OWN_SITES, own_site_arms, paired_tests

SUBJECTS = {"site-0": ("a", "b", "c"), "site-1": ("d", "e", "f")}
CENTRAL = {"site-0": [0.90, 0.80, 0.85], "site-1": [0.70, 0.75, 0.60]}
PERSONAL = {"site-0": [0.85, 0.82, 0.80], "site-1": [0.72, 0.70, 0.50]}  # each site's model, own cases only
PRIVATE = {"site-0": 0.5, "site-1": 0.4}  # each private model scores every case of both sites
GAPS = [p - c for site in SUBJECTS for p, c in zip(PERSONAL[site], CENTRAL[site], strict=True)]


def _rows(shift: float = 0.0) -> list[CaseRow]:
    rows = []
    for site, subjects in SUBJECTS.items():
        for i, subject in enumerate(subjects):
            rows.append(CaseRow("centralized", "centralized", "pooled", site, False, subject, (CENTRAL[site][i],)))
            score = PERSONAL[site][i] + shift
            rows.append(CaseRow("ditto-personal", "personal", site, site, False, subject, (score,)))
            for trained_on, private in PRIVATE.items():
                rows.append(CaseRow("private", "private", trained_on, site, False, subject, (private,)))
    for subject, score in (("o1", 0.3), ("o2", 0.4)):  # the personal models are not tested outside
        rows.append(CaseRow("centralized", "centralized", "pooled", "outside", True, subject, (score,)))
        for trained_on, private in PRIVATE.items():
            rows.append(CaseRow("private", "private", trained_on, "outside", True, subject, (private + 0.1,)))
    return rows


def _write(folder: Path, rows: list[CaseRow]) -> Path:
    folder.mkdir(parents=True)
    write_cases(folder / "cases.csv", rows)
    return folder


def test_a_personal_arm_is_one_model_and_a_private_arm_is_not() -> None:
    rows = _rows()
    assert own_site_arms(rows) == [("ditto-personal", OWN_SITES)]
    whole = next(t for t in paired_tests(rows, "centralized") if t.model == ("ditto-personal", OWN_SITES))
    assert whole.n == 6 and whole.mean_difference == pytest.approx(statistics.mean(GAPS))
    assert whole.p_wilcoxon == pytest.approx(stats.wilcoxon(GAPS).pvalue)
    assert whole.p_ttest == pytest.approx(stats.ttest_1samp(GAPS, 0.0).pvalue)
    per_site = [t.model for t in paired_tests(rows, "centralized")]
    assert per_site == [("ditto-personal", "site-0"), ("ditto-personal", "site-1"), ("ditto-personal", OWN_SITES)]
    # against a private model, and outside, the personal models stay one by one
    assert {t.model for t in paired_tests(rows, "private")} == {
        ("centralized", "pooled"),
        ("ditto-personal", "site-0"),
        ("ditto-personal", "site-1"),
    }
    assert [t.model for t in paired_tests(rows, "private", outside=True)] == [("centralized", "pooled")] * 2


@pytest.mark.parametrize("where", [("site-1", False), ("outside", True)])
def test_an_arm_tested_beyond_its_own_sites_is_not_paired_as_one(where: tuple[str, bool]) -> None:
    rows = _rows()
    extra = next(r for r in rows if r.model == ("ditto-personal", "site-0"))
    rows.append(dataclasses.replace(extra, tested_on=where[0], outside=where[1], subject="x"))
    assert own_site_arms(rows) == []
    assert all(t.model[1] != OWN_SITES for t in paired_tests(rows, "centralized"))


def test_the_reports_show_the_whole_arm_row(tmp_path: Path) -> None:
    run = _write(tmp_path / "run", _rows())
    text = build_report(run, tmp_path / "out").read_text()
    assert f"| ditto-personal (own sites) | centralized | 6 | {statistics.mean(GAPS):+.3f} |" in text


def test_pooled_over_runs_a_scan_is_averaged_over_the_runs_that_tested_it(tmp_path: Path) -> None:
    first = _write(tmp_path / "study", _rows())
    second_rows = [r for r in _rows(shift=0.1) if r.subject != "f"]  # subject f is tested in the first run only
    second = _write(tmp_path / "study-seed1", second_rows)
    (whole,) = [t for t in pooled_tests(read_runs([first, second]), "centralized") if t.model[1] == OWN_SITES]
    pooled = [g + (0.05 if i < 5 else 0.0) for i, g in enumerate(GAPS)]  # f: the first run's value only
    assert whole.n == 6 and whole.mean_difference == pytest.approx(statistics.mean(pooled))
    assert whole.p_ttest == pytest.approx(stats.ttest_1samp(pooled, 0.0).pvalue)
    text = build_seed_report([first, second], tmp_path / "seeds").read_text()
    assert f"| ditto-personal (own sites) | centralized | 6 | {statistics.mean(pooled):+.3f} |" in text


def test_across_two_configurations_the_whole_arm_is_paired_with_itself(tmp_path: Path) -> None:
    ours = [_write(tmp_path / "a" / "study", _rows(shift=0.03))]
    theirs = [_write(tmp_path / "b" / "study", _rows())]
    tests, same = against_tests(read_runs(ours, minimum=1), read_runs(theirs, minimum=1), outside=False)
    whole = next(t for t in tests if t.model == ("ditto-personal", OWN_SITES))
    assert whole.n == 6 and whole.mean_difference == pytest.approx(0.03)
    assert ("centralized", "pooled") in same and ("private", "site-0") in same
    outside, alike = against_tests(read_runs(ours, minimum=1), read_runs(theirs, minimum=1), outside=True)
    assert outside == [] and alike == [("centralized", "pooled"), ("private", "site-0"), ("private", "site-1")]
    text = build_against_report(ours, theirs, tmp_path / "vs").read_text()
    assert "| ditto-personal (own sites) | 6 | +0.0300 |" in text


def test_each_configuration_s_models_against_the_other_s_centralized_model(tmp_path: Path) -> None:
    ours = [_write(tmp_path / "a" / "study", _rows(shift=0.03))]
    other_rows = [
        dataclasses.replace(r, dice=(r.dice[0] + 0.1,)) if r.arm == "centralized" else r for r in _rows()
    ]  # the other configuration's pooled model scores 0.1 more on every scan
    theirs = [_write(tmp_path / "b" / "study-b", other_rows)]
    tests = cross_reference_tests(read_runs(ours, minimum=1), read_runs(theirs, minimum=1))
    assert [t.model for t in tests] == [
        ("ditto-personal", "site-0"),
        ("ditto-personal", "site-1"),
        ("ditto-personal", OWN_SITES),
    ]
    whole = tests[-1]
    shifted = [g + 0.03 - 0.1 for g in GAPS]
    assert whole.n == 6 and whole.mean_difference == pytest.approx(statistics.mean(shifted))
    assert whole.p_ttest == pytest.approx(stats.ttest_1samp(shifted, 0.0).pvalue)
    text = build_against_report(ours, theirs, tmp_path / "vs").read_text()
    forwards = _section(text, "## Paired tests, internal test cases: study's models against study-b's centralized")
    assert f"| ditto-personal (own sites) | centralized | 6 | {statistics.mean(shifted):+.3f} |" in forwards
    backwards = _section(text, "## Paired tests, internal test cases: study-b's models against study's centralized")
    gap = statistics.mean(GAPS)  # study-b's personal models (unshifted) − study's pooled model (unshifted)
    assert f"| ditto-personal (own sites) | centralized | 6 | {gap:+.3f} |" in backwards


def test_a_side_without_a_centralized_arm_is_still_measured_against_the_other_s(tmp_path: Path) -> None:
    ours = [_write(tmp_path / "a" / "study", [r for r in _rows() if r.arm != "centralized"])]
    theirs = [_write(tmp_path / "b" / "study-b", _rows())]
    tests = cross_reference_tests(read_runs(ours, minimum=1), read_runs(theirs, minimum=1))
    assert tests[-1].model == ("ditto-personal", OWN_SITES)
    assert tests[-1].mean_difference == pytest.approx(statistics.mean(GAPS))
    assert cross_reference_tests(read_runs(theirs, minimum=1), read_runs(ours, minimum=1)) == []
    text = build_against_report(ours, theirs, tmp_path / "vs").read_text()
    assert "study's models against study-b's centralized model" in text
    assert "study-b's models against study's centralized model" not in text  # study has no centralized arm


def _section(text: str, heading: str) -> str:
    """The lines after the heading that starts with `heading`, up to the next heading."""
    after = text.split(heading, 1)[1]
    return after.split("\n## ", 1)[0]
