"""The seeds report from hand-made runs: % of centralized per run and on average, pooled paired tests."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from scipy import stats
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.report import build_against_report, build_seed_report
from fedseg.report.against import against_tests
from fedseg.report.cases import CaseRow, CasesError, read_cases, write_cases
from fedseg.report.layout import PERSONAL, PERSONAL_MEAN
from fedseg.report.seeds import outside_by_model, pooled_tests, read_runs, seed_summaries
from fedseg.report.software import software_section

# per run: arm → internal scores of its test subjects at site-0 (s1 and s2 are in both runs' test sets);
# the second run has no fedprox arm
SUBJECTS = {"study": ("s1", "s2", "s3"), "study-seed1": ("s1", "s2", "s4")}
RUNS = {
    "study": {"centralized": [0.8, 0.9, 1.0], "fedavg": [0.7, 0.9, 0.8], "fedprox": [0.9, 0.9, 0.9]},
    "study-seed1": {"centralized": [0.6, 0.6, 0.6], "fedavg": [0.5, 0.55, 0.45]},
}
KINDS = {"centralized": "centralized", "fedavg": "federated", "fedprox": "federated"}
OUTSIDE = {"study": {"fedavg": 0.3, "centralized": 0.1}, "study-seed1": {"fedavg": 0.5, "centralized": 0.3}}
# fedavg vs centralized, a scan once: s1, s2 averaged over both runs; s3 first run only; s4 second only
POOLED_FEDAVG = [(0.7 + 0.5) / 2, (0.9 + 0.55) / 2, 0.8, 0.45]
POOLED_CENTRAL = [(0.8 + 0.6) / 2, (0.9 + 0.6) / 2, 1.0, 0.6]


def _write_runs(root: Path) -> list[Path]:
    folders = []
    for name, arms in RUNS.items():
        rows = []
        for arm, scores in arms.items():
            trained_on = "pooled" if arm == "centralized" else "federation"
            rows += [
                CaseRow(arm, KINDS[arm], trained_on, "site-0", False, subject, (score, score))
                for subject, score in zip(SUBJECTS[name], scores, strict=True)
            ]
            if arm in OUTSIDE[name]:
                rows.append(CaseRow(arm, KINDS[arm], trained_on, "outside", True, "o1", (OUTSIDE[name][arm], math.nan)))
        (root / name).mkdir()
        write_cases(root / name / "cases.csv", rows)
        folders.append(root / name)
    return folders


def test_each_models_outside_dice_per_run_and_the_runs_it_is_best_in(tmp_path: Path) -> None:
    folders = _write_runs(tmp_path)
    extra = [CaseRow("private", "private", f"site-{k}", "outside", True, "o1", (v, v)) for k, v in ((0, 0.4), (1, 0.2))]
    write_cases(folders[0] / "cases.csv", [*read_cases(folders[0] / "cases.csv"), *extra])
    found = {m.model: m for m in outside_by_model(read_runs(folders))}
    assert found[("private", "site-0")].outside[0] == pytest.approx(0.4)
    assert math.isnan(found[("private", "site-0")].outside[1])
    assert found[("fedavg", "federation")].outside == pytest.approx((0.3, 0.5))  # (0.3 + nan) / 1 scored class
    assert {m: f.best for m, f in found.items()} == {
        ("fedavg", "federation"): 1,  # run 2: 0.5 against centralized 0.3
        ("centralized", "pooled"): 0,
        ("private", "site-0"): 1,  # run 1: 0.4 against fedavg 0.3
        ("private", "site-1"): 0,
    }
    report = build_seed_report(folders, tmp_path / "out").read_text()
    assert "| private (site-0) | 0.400 | – | 0.400 | 1 of 2 |" in report
    assert "| fedavg | 0.300 | 0.500 | 0.400 | 1 of 2 |" in report


def test_percent_per_run_and_mean_over_the_runs_that_have_the_arm(tmp_path: Path) -> None:
    summaries = {s.arm: s for s in seed_summaries(read_runs(_write_runs(tmp_path)))}
    assert summaries["fedavg"].percent == pytest.approx((100 * 0.8 / 0.9, 100 * 0.5 / 0.6))
    assert summaries["fedavg"].mean_percent == pytest.approx((100 * 0.8 / 0.9 + 100 * 0.5 / 0.6) / 2)
    assert summaries["fedprox"].percent[0] == pytest.approx(100.0) and math.isnan(summaries["fedprox"].percent[1])
    assert summaries["fedprox"].mean_percent == pytest.approx(100.0)
    assert summaries["fedavg"].outside == pytest.approx((0.3, 0.5))


def test_pooled_tests_count_a_scan_once_averaged_over_the_runs(tmp_path: Path) -> None:
    fedavg, fedprox = pooled_tests(read_runs(_write_runs(tmp_path)), "centralized")
    assert fedprox.model == ("fedprox", "federation") and fedprox.n == 3  # the first run's cases only
    assert fedavg.model == ("fedavg", "federation") and fedavg.n == 4
    differences = [f - c for f, c in zip(POOLED_FEDAVG, POOLED_CENTRAL, strict=True)]
    assert fedavg.mean_difference == pytest.approx(sum(differences) / 4)
    assert fedavg.p_ttest == pytest.approx(stats.ttest_rel(POOLED_FEDAVG, POOLED_CENTRAL).pvalue)


def test_report_has_the_pooled_wilcoxon_p_value(tmp_path: Path) -> None:
    text = build_seed_report(_write_runs(tmp_path), tmp_path / "out").read_text()
    p = stats.wilcoxon(POOLED_FEDAVG, POOLED_CENTRAL).pvalue
    line = next(x for x in text.splitlines() if x.startswith("| fedavg | centralized |"))
    difference = sum(f - c for f, c in zip(POOLED_FEDAVG, POOLED_CENTRAL, strict=True)) / 4
    assert f"| 4 | {difference:+.3f} | {p:.3g} |" in line
    row = next(x for x in text.splitlines() if x.startswith("| fedavg | federated | 88.9 %"))
    assert row.endswith(f"| {(100 * 0.8 / 0.9 + 100 * 0.5 / 0.6) / 2:.1f} % |")
    assert "| fedprox | federated | 100.0 % | – | 100.0 % |" in text
    assert "| fedavg | federated | 0.300 | 0.500 | 0.400 |" in text
    assert "No private arm, or no arm to compare with it outside: nothing to pair." in text


def test_bad_inputs_are_one_line_errors(tmp_path: Path) -> None:
    first, second = _write_runs(tmp_path)
    with pytest.raises(CasesError, match="at least two"):
        read_runs([first])
    with pytest.raises(CasesError, match="is given twice"):
        read_runs([first, f"{tmp_path}/./study/"])
    (tmp_path / "elsewhere" / "study").mkdir(parents=True)
    with pytest.raises(CasesError, match="share the name study"):
        read_runs([first, tmp_path / "elsewhere" / "study"])
    with pytest.raises(CasesError, match="is one of the results folders"):
        build_seed_report([first, second], first)
    (second / "cases.csv").write_text("")
    with pytest.raises(CasesError, match="empty file"):
        read_runs([first, second])
    (second / "cases.csv").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(CasesError, match="not a CSV text file"):
        read_runs([first, second])
    write_cases(second / "cases.csv", [CaseRow("fedavg", "federated", "federation", "site-0", False, "s1", (0.5,))])
    with pytest.raises(CasesError, match="must score the same ones"):
        read_runs([first, second])
    runner = CliRunner()
    result = runner.invoke(app, ["report", str(first), str(tmp_path / "absent")], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: 2 results folders need --out (a folder for their report.md)"]
    result = runner.invoke(
        app, ["report", str(first), str(tmp_path / "absent"), "--out", str(tmp_path / "o")], catch_exceptions=False
    )
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "cases.csv: cannot read cases file" in lines[0]


def _write_other_configuration(root: Path, shift: float) -> list[Path]:
    """The same two runs under other names, fedavg scoring `shift` more on every scan, centralized copied."""
    folders = []
    for name, source in zip(("other", "other-seed1"), _write_runs(root), strict=True):
        rows = [
            dataclasses.replace(row, dice=tuple(d + shift for d in row.dice)) if row.arm == "fedavg" else row
            for row in read_cases(source / "cases.csv")
        ]
        (root / name).mkdir()
        write_cases(root / name / "cases.csv", rows)
        folders.append(root / name)
    return folders


def test_against_pairs_each_model_across_two_configurations_scan_by_scan(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours, theirs = _write_runs(tmp_path / "a"), _write_other_configuration(tmp_path / "b", 0.04)
    tests, same = against_tests(read_runs(ours), read_runs(theirs), outside=False)
    assert same == [("centralized", "pooled"), ("fedprox", "federation")]  # alike on both sides: not tested
    fedavg = next(t for t in tests if t.model == ("fedavg", "federation"))
    assert fedavg.n == 4 and fedavg.mean_difference == pytest.approx(-0.04)
    shifted = [score + 0.04 for score in POOLED_FEDAVG]
    assert fedavg.p_ttest == pytest.approx(stats.ttest_rel(POOLED_FEDAVG, shifted).pvalue)
    outside, _ = against_tests(read_runs(ours), read_runs(theirs), outside=True)
    assert [(t.model, t.n, round(t.mean_difference, 6)) for t in outside] == [(("fedavg", "federation"), 1, -0.04)]
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["report", *map(str, ours), "--against", ", ".join(map(str, theirs)) + ",", "--out", str(tmp_path / "vs")],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    text = (tmp_path / "vs" / "report.md").read_text()
    assert "| fedavg | 4 | -0.0400 |" in text
    assert "The same on both sides (every scan's Dice equal; not tested): centralized, fedprox." in text
    assert "| fedprox | 100.0 % | 100.0 % |" in text
    result = runner.invoke(app, ["report", str(ours[0]), "--against", str(theirs[0])], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --against needs --out (a folder for the comparison's report.md)"
    ]
    result = runner.invoke(
        app, ["report", str(ours[0]), "--against", str(ours[0]), "--out", str(tmp_path / "o")], catch_exceptions=False
    )
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        f"error: results folder {ours[0]} is on both sides of --against"
    ]


def test_pair_tests_an_arm_against_a_differently_named_arm_of_the_other_configuration(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours, theirs = _write_runs(tmp_path / "a"), _write_other_configuration(tmp_path / "b", 0.04)
    tests, _ = against_tests(read_runs(ours), read_runs(theirs), outside=False, pairs={"fedprox": "fedavg"})
    paired = next(t for t in tests if t.model != t.reference)
    assert (paired.model, paired.reference) == (("fedprox", "federation"), ("fedavg", "federation"))
    # fedprox ran in the first run only (s1-s3 at 0.9), their fedavg is pooled over both runs, +0.04
    theirs_scores = [score + 0.04 for score in POOLED_FEDAVG[:3]]
    assert paired.n == 3 and paired.mean_difference == pytest.approx(0.9 - sum(theirs_scores) / 3)
    assert paired.p_ttest == pytest.approx(stats.ttest_rel([0.9] * 3, theirs_scores).pvalue)
    runner = CliRunner()
    args = ["report", *map(str, ours), "--against", ",".join(map(str, theirs)), "--out", str(tmp_path / "vs")]
    result = runner.invoke(app, [*args, "--pair", "fedprox=fedavg"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    text = (tmp_path / "vs" / "report.md").read_text()
    assert f"| fedprox against fedavg | 3 | {paired.mean_difference:+.4f} |" in text
    assert "Also paired: fedprox against fedavg (--pair)." in text
    # fedprox ran in the first run only: 0.9 against its centralized 0.9; their fedavg 0.84 / 0.9 and 0.54 / 0.6
    assert f"| fedprox against fedavg | 100.0 % | {(0.84 / 0.9 + 0.54 / 0.6) / 2 * 100:.1f} % |" in text
    for bad, error in [
        (["--pair", "fedprox"], "error: --pair 'fedprox': expected OURS=THEIRS, two arm names"),
        (["--pair", "=fedavg"], "error: --pair '=fedavg': expected OURS=THEIRS, two arm names"),
        (["--pair", "a=fedavg", "--pair", "a=fedprox"], "error: --pair: arm 'a' is paired twice"),
        (
            ["--pair", "ditto=fedavg"],
            "error: --pair: the first configuration has no arm 'ditto'; it has centralized, fedavg, fedprox",
        ),
        (
            ["--pair", "fedavg=fedavgm"],
            "error: --pair: the second configuration has no arm 'fedavgm'; it has centralized, fedavg, fedprox",
        ),
    ]:
        result = runner.invoke(app, [*args, *bad], catch_exceptions=False)
        assert result.exit_code == 2 and result.output.strip().splitlines() == [error], bad
    result = runner.invoke(app, ["report", str(ours[0]), "--pair", "fedprox=fedavg"], catch_exceptions=False)
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --pair needs --against (the configuration whose arms it names)"
    ]


def test_against_accepts_runs_that_share_a_name_across_the_sides(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours, theirs = _write_runs(tmp_path / "a"), _write_runs(tmp_path / "b")  # the same names on both sides
    text = build_against_report(ours, theirs, tmp_path / "vs").read_text()
    assert "Nothing to pair: every model both trained scores alike." in text
    assert "The same on both sides (every scan's Dice equal; not tested): centralized, fedavg, fedprox." in text


def _record_software(folder: Path, arm: str, software: object, history: object = None) -> None:
    (folder / "arms" / arm).mkdir(parents=True, exist_ok=True)
    info = {"arm": arm, "kind": "federated", "trained_on": "federation", "model_bytes": 1, "sites": 2, "seconds": 1.0}
    (folder / "arms" / arm / "arm.json").write_text(json.dumps({**info, "software": software}))
    if history is not None:
        (folder / "arms" / arm / "history.json").write_text(json.dumps({"rounds": [], "software": history}))


PERSONALS = (PERSONAL, PERSONAL_MEAN)
ARM_IDS = {"study": ("centralized--pooled", "fedavg--federation", "fedprox--federation")}
ARM_IDS["study-seed1"] = ARM_IDS["study"][:2]
OLD = {"python": "3.11.7", "torch": "2.12.0+cpu", "flwr": "1.41.0"}
NEW = {"python": "3.11.7", "torch": "2.13.0+cpu", "flwr": "1.42.0"}
OLD_LINE, NEW_LINE = "python 3.11.7, torch 2.12.0+cpu, flwr 1.41.0", "python 3.11.7, torch 2.13.0+cpu, flwr 1.42.0"


def _software(report: str) -> str:
    return report[report.index("## Software") :]


def test_software_section_names_each_set_and_warns_when_runs_differ(tmp_path: Path) -> None:
    first, second = _write_runs(tmp_path)
    for arm in ARM_IDS["study"]:
        _record_software(first, arm, OLD)
    for arm in ARM_IDS["study-seed1"]:
        _record_software(second, arm, dict(reversed(NEW.items())))  # the order of the names does not matter
    software = _software(build_seed_report([first, second], tmp_path / "out").read_text())
    assert software.startswith("## Software\n\n**The arms ran with different software.**")
    assert f"- {OLD_LINE}: study (3 arms)\n- {NEW_LINE}: study-seed1 (2 arms)" in software
    assert "no software record" not in software

    for arm in ARM_IDS["study-seed1"]:
        _record_software(second, arm, OLD)
    same = _software(build_seed_report([first, second], tmp_path / "same").read_text())
    assert "Every arm ran with this one software set" in same and "different" not in same
    assert f"- {OLD_LINE}: study (3 arms), study-seed1 (2 arms)" in same


def test_software_section_counts_arms_without_a_record_and_ignores_records_of_no_arm(tmp_path: Path) -> None:
    first, second = _write_runs(tmp_path)
    assert "No arm has a software record" in _software(build_seed_report([first, second], tmp_path / "a").read_text())
    for arm in ARM_IDS["study"]:
        _record_software(first, arm, OLD)
    _record_software(second, "fedavg--federation", NEW)
    _record_software(second, "fedprox--federation", OLD)  # study-seed1 has no fedprox arm: not counted
    software = _software(build_seed_report([first, second], tmp_path / "b").read_text())
    assert "**The arms ran with different software.**" in software and "Some arms have no software record" in software
    expected = {
        f"- {OLD_LINE}: study (3 arms)",
        f"- {NEW_LINE}: study-seed1 (1 arm)",
        "- not recorded: study-seed1 (1 arm)",
    }
    assert expected <= set(software.splitlines())


def test_personal_models_count_under_the_federated_arm_that_trained_them(tmp_path: Path) -> None:
    # Ditto's personal models and their means are rows of their own arms but have no folder of their own:
    # before, every report of a Ditto study warned that they had "no software record"
    rows = [CaseRow("centralized", "centralized", "pooled", "site-0", False, "a", (0.8,))]
    rows += [CaseRow("ditto", "federated", "federation", "site-0", False, "a", (0.7,))]
    rows += [CaseRow(f"ditto{kind}", "personal", "site-0", "site-0", False, "a", (0.75,)) for kind in PERSONALS]
    write_cases(tmp_path / "cases.csv", rows)
    for arm in ("centralized--pooled", "ditto--federation"):
        _record_software(tmp_path, arm, NEW)
    software = software_section([("study", tmp_path, read_cases(tmp_path / "cases.csv"))])
    assert software.startswith("Every arm ran with this one software set"), software
    assert software.endswith(f"- {NEW_LINE}: study (2 arms)"), software


def test_software_of_a_resumed_arm_lists_every_set_it_trained_under(tmp_path: Path) -> None:
    first, second = _write_runs(tmp_path)
    for arm in ARM_IDS["study"]:
        _record_software(first, arm, NEW, history=[{"from-round": 1, **NEW}])
    _record_software(first, "fedavg--federation", NEW, history=[{"from-round": 1, **OLD}, {"from-round": 7, **NEW}])
    software = _software(build_seed_report([first, second], tmp_path / "out").read_text())
    assert f"- {NEW_LINE}: study (2 arms)\n- mixed: {OLD_LINE} | {NEW_LINE}: study (1 arm)" in software
    assert "**The arms ran with different software.**" in software


def test_a_run_without_a_centralized_model_gets_its_percent_from_the_other_side_s_run_of_the_same_scans(
    tmp_path: Path,
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    theirs = _write_runs(tmp_path / "b")
    ours = []
    for name, source in zip(("new", "new-seed1"), theirs, strict=True):  # only a new arm, on the same scans
        rows = [
            dataclasses.replace(row, arm="fedexp", dice=tuple(d + 0.05 for d in row.dice))
            for row in read_cases(source / "cases.csv")
            if row.arm == "fedavg"
        ]
        (tmp_path / "a" / name).mkdir()
        write_cases(tmp_path / "a" / name / "cases.csv", rows)
        ours.append(tmp_path / "a" / name)
    text = build_against_report(list(reversed(ours)), theirs, tmp_path / "vs", pairs={"fedexp": "fedavg"}).read_text()
    # per run: (fedavg + 0.05) against that run's centralized, matched by scans whatever the folders' order
    percent = [
        100 * (sum(RUNS[n]["fedavg"]) / 3 + 0.05) / (sum(RUNS[n]["centralized"]) / 3) for n in ("study", "study-seed1")
    ]
    fedavg = [100 * sum(RUNS[n]["fedavg"]) / sum(RUNS[n]["centralized"]) for n in ("study", "study-seed1")]
    assert f"| fedexp against fedavg | {sum(percent) / 2:.1f} % | {sum(fedavg) / 2:.1f} % |" in text
    assert "Without a centralized model of their own, new-seed1, new count against the other configuration's" in text
    assert "| centralized |" not in text[: text.index("## Paired tests")]  # borrowed, not trained by both
    # a run whose scans no run of the other side tested stays without a %
    alone = [r for r in read_cases(ours[0] / "cases.csv")]
    (tmp_path / "a" / "odd").mkdir()
    write_cases(tmp_path / "a" / "odd" / "cases.csv", [dataclasses.replace(r, subject=r.subject + "x") for r in alone])
    odd = build_against_report([tmp_path / "a" / "odd"], theirs, tmp_path / "odd-vs", pairs={"fedexp": "fedavg"})
    assert f"| fedexp against fedavg | – | {sum(fedavg) / 2:.1f} % |" in odd.read_text()


def test_against_report_tells_the_two_sides_runs_apart(tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    (first,), (other,) = _write_runs(ours)[:1], _write_runs(theirs)[:1]
    for arm in ARM_IDS["study"]:
        _record_software(first, arm, NEW)
        _record_software(other, arm, OLD)
    software = _software(build_against_report([first], [other], tmp_path / "out").read_text())
    assert f"- {NEW_LINE}: study (3 arms)\n- {OLD_LINE}: study (against) (3 arms)" in software


@pytest.mark.parametrize(
    ("file", "content", "fault"),
    [
        ("arm.json", "{not json", "not a readable JSON record (JSONDecodeError)"),
        ("arm.json", "[" * 100_000, "not a readable JSON record (RecursionError)"),
        ("arm.json", "[1, 2]", "not a JSON object"),
        ("arm.json", json.dumps({"software": {"torch": 2.13}}), "'software' must map package names to version strings"),
        ("arm.json", json.dumps({"software": "torch 2.13"}), "'software' must map package names to version strings"),
        ("history.json", json.dumps({"software": "torch"}), "'software' must be a list of version records"),
        ("history.json", json.dumps({"software": [[1]]}), "'software' must map package names to version strings"),
    ],
)
def test_a_broken_record_is_a_one_line_error_naming_it(tmp_path: Path, file: str, content: str, fault: str) -> None:
    first, second = _write_runs(tmp_path)
    (second / "arms" / "fedavg--federation").mkdir(parents=True)
    (second / "arms" / "fedavg--federation" / file).write_text(content)
    result = CliRunner().invoke(app, ["report", str(first), str(second), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert f"fedavg--federation/{file}: {fault}" in result.output


def test_a_version_cannot_break_the_report_s_lines(tmp_path: Path) -> None:
    first, second = _write_runs(tmp_path)
    _record_software(first, "fedavg--federation", {"torch": "2.0\n## injected " + "x" * 500})
    software = _software(build_seed_report([first, second], tmp_path / "out").read_text())
    assert "- torch 2.0 ## injected xxx" in software and "\n## injected" not in software
    assert max(len(line) for line in software.splitlines()) < 400


def test_dice_per_structure_over_the_runs_each_arm_against_its_own_runs_centralized_model(tmp_path: Path) -> None:
    text = build_seed_report(_write_runs(tmp_path), tmp_path / "out").read_text()
    assert "## Dice per structure over the runs" in text
    # fedprox ran in the first run only: 0.9 against that run's centralized 0.9 (not 0.75, both runs')
    assert "| fedprox | 0.900 (100.0 %) | 0.900 (100.0 %) |" in text
    fedavg = sum(RUNS["study"]["fedavg"] + RUNS["study-seed1"]["fedavg"]) / 6
    central = sum(RUNS["study"]["centralized"] + RUNS["study-seed1"]["centralized"]) / 6
    assert f"| fedavg | {fedavg:.3f} ({100 * fedavg / central:.1f} %) |" in text
