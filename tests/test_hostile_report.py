"""Hostile results folders against `fedseg report`: cases.csv, arm.json, history.json and overlay files that
are malformed, out of range or built to exhaust memory or time give one `error:` line naming the file and
the key or fault, and the report's own numbers stay what they were (the bootstrap interval bit for bit)."""

from __future__ import annotations

import json
import math
import tracemalloc
import warnings
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats
from test_hostile_input import cli, refused

from fedseg.json_records import read_json_object
from fedseg.limits import MAX_RECORD_BYTES
from fedseg.report import against, plots, seeds, summary, tables
from fedseg.report.cases import (
    MAX_CASES_MODELS,
    MAX_CASES_TEST_SETS,
    CaseRow,
    CasesError,
    read_cases,
    write_cases,
)
from fedseg.report.tables import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, MAX_PAIRED_TESTS, bootstrap_ci, paired_test

ARM = "fedavg--federation"
HEADER = "arm,kind,trained_on,tested_on,outside,subject,dice_1,dp_kind,epsilon,delta\n"
GOOD_ARM = {"arm": "fedavg", "kind": "federated", "trained_on": "federation", "model_bytes": 1000, "sites": 2,
            "seconds": 3.0, "software": {}}  # fmt: skip


def good_round(number: int) -> dict:
    return {"round": number, "mean_dice": 0.5, "seconds": 1.0, "train": {"site-0": {}, "site-1": {}}}


@pytest.fixture()
def results(tmp_path: Path) -> Path:
    """A results folder: cases.csv of a private and a federated model, and the federated arm's records."""
    rows = [
        CaseRow(arm, kind, on, "site-0", False, subject, (score,))
        for arm, kind, on, scores in (("private", "private", "site-0", (0.5, 0.6, 0.7)),
                                      ("fedavg", "federated", "federation", (0.6, 0.8, 0.7)))
        for subject, score in zip("abc", scores, strict=True)
    ]  # fmt: skip
    write_cases(tmp_path / "cases.csv", rows)
    (tmp_path / "arms" / ARM).mkdir(parents=True)
    write_records(tmp_path, GOOD_ARM, {"rounds": [good_round(r) for r in range(3)]})
    return tmp_path


def write_records(results: Path, arm: dict | str, history: dict | str) -> None:
    for name, record in (("arm.json", arm), ("history.json", history)):
        (results / "arms" / ARM / name).write_text(record if isinstance(record, str) else json.dumps(record))


def raises_naming(call: Callable[[], object], file: Path, fault: str) -> None:
    """`call` raises a one-line CasesError starting with `file` and holding `fault`."""
    with pytest.raises(CasesError) as caught:
        call()
    message = str(caught.value)
    assert message.startswith(f"{file}: ") and fault in message and len(message.splitlines()) == 1, message


def curves(results: Path) -> list[plots.Curve]:
    return plots.load_curves(results, {("fedavg", "federation")})


def test_the_good_results_folder_reports(results: Path) -> None:
    code, output = cli("report", results, "--out", results / "out")
    assert code == 0, output
    assert (results / "out" / "dice_vs_round.png").is_file()


@pytest.mark.parametrize(
    ("file", "record", "fault"),
    [
        ("arm.json", json.dumps(GOOD_ARM | {"arm": ["x"]}), "'arm' must be a non-empty string"),
        ("history.json", '{"rounds": [{"round": 1' + "0" * 400 + ', "mean_dice": 1, "seconds": 1}]}', "'rounds[0]"),
        ("history.json", None, "larger than the 64 MiB a JSON record may have"),
    ],
)
def test_the_command_refuses_a_hostile_record_on_one_line(
    results: Path, file: str, record: str | None, fault: str
) -> None:
    path = results / "arms" / ARM / file
    if record is None:
        with path.open("r+b") as handle:
            handle.truncate(2**33)  # sparse 8 GiB: read whole, out of memory
    else:
        path.write_text(record)
    code, output = cli("report", results, "--out", results / "out")
    refused(code, output, path)
    assert len(output.strip().splitlines()) == 1 and fault in output, output


# ---------------------------------------------------------------------------------------------- 1. bootstrap
def test_bootstrap_interval_is_unchanged_and_its_memory_bounded() -> None:
    rng = np.random.default_rng(7)
    for size in (2, 3, 17, 101, 2000):  # the interval of scipy's bootstrap of all resamples at once
        values = rng.random(size)
        whole = stats.bootstrap(
            (values,),
            np.mean,
            confidence_level=0.95,
            n_resamples=BOOTSTRAP_RESAMPLES,
            method="percentile",
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        ).confidence_interval
        assert bootstrap_ci(list(values)) == (float(whole.low), float(whole.high)), size
    values = list(np.random.default_rng(1).random(2000))
    tracemalloc.start()
    try:
        bootstrap_ci(values)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 48 * 2**20, peak  # before: 2000 × 9999 resampled values and indices at once, 320 MB


# ---------------------------------------------------------------------------------------------- 2. plots of many sets
class CountedRows(list):
    """Rows that count the passes over them."""

    passes = 0

    def __iter__(self) -> Iterator[CaseRow]:
        self.passes += 1
        return super().__iter__()


def test_heatmap_and_box_plot_draw_a_bounded_number_of_panels_in_a_few_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = CountedRows(
        CaseRow(f"arm-{m}", "federated", "federation", f"site-{s}", False, "a", (0.5,))
        for s in range(plots.MAX_TEST_SETS + 4)
        for m in range(3)
    )
    figures: list[plt.Figure] = []
    close = plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (figures.append(fig), close(fig)))
    plots.plot_boxes(rows, tmp_path / "boxes.png")
    assert rows.passes <= 8, rows.passes  # before: two per model of each panel (120 here)
    (boxes,) = figures
    assert len(boxes.axes) == plots.MAX_TEST_SETS
    assert boxes.get_suptitle() == f"(the first {plots.MAX_TEST_SETS} of {plots.MAX_TEST_SETS + 4} test sets shown)"
    plots.plot_heatmap(rows, {m: {} for m in {r.model for r in rows}}, tmp_path / "heatmap.png")
    assert len(figures[1].axes[0].get_xticklabels()) == plots.MAX_TEST_SETS
    assert f"the first {plots.MAX_TEST_SETS} of {plots.MAX_TEST_SETS + 4} test sets" in figures[1].axes[0].get_title()


# ---------------------------------------------------------------------------------------------- 3. arm.json
@pytest.mark.parametrize(
    ("key", "value", "fault"),
    [
        ("arm", ["x"], "'arm' must be a non-empty string"),
        ("arm", "", "'arm' must be a non-empty string"),
        ("trained_on", "fed\neration", "'trained_on' must be a non-empty string of printable characters"),
        ("kind", 3, "'kind' must be a non-empty string"),
        ("model_bytes", "x" * 10_000, "'model_bytes' must be an integer in [0, 2**53], got str"),
        ("model_bytes", 10**400, "'model_bytes' must be an integer in [0, 2**53], got an integer of more than 15"),
        ("model_bytes", 1.5, "'model_bytes' must be an integer"),
        ("sites", True, "'sites' must be an integer in [0, 2**53], got bool"),
        ("sites", -1, "'sites' must be an integer in [0, 2**53], got -1"),
        ("seconds", "3", "'seconds' must be a number in [0, 2**53], got str"),
        ("seconds", math.inf, "'seconds' must be a number in [0, 2**53], got inf"),
        ("software", {"torch": 2}, "'software' must map package names to version strings"),
    ],
)
def test_a_wrongly_typed_or_out_of_range_arm_record_names_the_file_and_key(
    results: Path, key: str, value: object, fault: str
) -> None:
    history = {"rounds": [good_round(0) | {"train": {f"site-{i}": {} for i in range(1000)}}]}
    write_records(results, GOOD_ARM | {key: value}, history)
    raises_naming(lambda: curves(results), results / "arms" / ARM / "arm.json", fault)


# ---------------------------------------------------------------------------------------------- 4. history.json
@pytest.mark.parametrize(
    ("text", "fault"),
    [
        ('{"rounds": [{"round": 1' + "0" * 400 + ', "mean_dice": 0.5, "seconds": 1}]}', "'rounds[0].round' must be"),
        ('{"rounds": [{"round": true, "mean_dice": 0.5, "seconds": 1}]}', "'rounds[0].round' must be an integer"),
        (
            '{"rounds": [{"round": 0, "mean_dice": 2, "seconds": 1}]}',
            "'rounds[0].mean_dice' must be a number in [0, 1]",
        ),
        ('{"rounds": [{"round": 0, "mean_dice": 0.5, "seconds": Infinity}]}', "'rounds[0].seconds' must be a number"),
        ('{"rounds": [{"round": 0, "mean_dice": 0.5, "seconds": 1e400}]}', "'rounds[0].seconds' must be a number"),
        ('{"rounds": [{"round": 0, "mean_dice": 0.5, "seconds": 1, "train": []}]}', "not a run history (TypeError)"),
        ('{"rounds": {"round": 0}}', "not a run history (TypeError)"),
    ],
)
def test_a_history_value_the_plots_cannot_use_names_the_file_and_value(results: Path, text: str, fault: str) -> None:
    write_records(results, GOOD_ARM, text)
    raises_naming(lambda: curves(results), results / "arms" / ARM / "history.json", fault)


def test_a_round_without_test_dice_still_plots(results: Path) -> None:
    write_records(results, GOOD_ARM, '{"rounds": [{"round": 0, "mean_dice": NaN, "seconds": 1}]}')
    (curve,) = curves(results)
    assert curve.rounds == [0] and math.isnan(curve.dice[0]) and curve.megabytes == [0.0]
    plots.plot_rounds([curve], results / "rounds.png")


# ---------------------------------------------------------------------------------------------- 5. record size
@pytest.mark.parametrize("name", ["arm.json", "history.json"])
def test_a_record_larger_than_the_cap_is_refused_from_its_size(results: Path, name: str) -> None:
    with (results / "arms" / ARM / name).open("r+b") as handle:
        handle.truncate(MAX_RECORD_BYTES + 1)  # sparse: its size, not its bytes, says no
    raises_naming(lambda: curves(results), results / "arms" / ARM / name, "larger than the 64 MiB a JSON record may")


def test_a_record_that_never_ends_is_read_only_up_to_the_cap(tmp_path: Path) -> None:
    (tmp_path / "history.json").symlink_to("/dev/zero")  # its size says 0
    with pytest.raises(ValueError, match=r"history.json: larger than the 64 MiB a JSON record may have$"):
        read_json_object(tmp_path / "history.json")


# ---------------------------------------------------------------------------------------------- 6. overlays
def overlay(path: Path, **arrays: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def good_overlay(path: Path, shape: tuple[int, int] = (24, 20)) -> Path:
    truth = np.zeros(shape, np.uint8)
    truth[4:10, 4:10] = 1
    return overlay(path, image=np.ones(shape, np.float16), truth=truth, prediction=truth)


def header_only(path: Path, shape: tuple[int, ...]) -> Path:
    """An overlay whose arrays' .npy headers claim `shape` and hold no data (a 30000² claim in 300 bytes)."""
    header = {"descr": "|u1", "fortran_order": False, "shape": shape}
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for key in ("image", "truth", "prediction"):
            with archive.open(f"{key}.npy", "w") as member:
                np.lib.format.write_array_header_1_0(member, header)
    return path


def test_overlays_are_drawn_and_a_large_slice_is_subsampled(results: Path) -> None:
    good_overlay(results / "overlays" / "site-0--a" / f"{ARM}.npz")
    big = good_overlay(results / "overlays" / "site-0--b" / f"{ARM}.npz", (1000, 600))
    code, output = cli("report", results, "--out", results / "out")
    assert code == 0 and (results / "out" / "overlays.png").is_file(), output
    assert [a.shape for a in plots.read_overlay(big, "image", "truth")] == [(250, 150)] * 2


@pytest.mark.parametrize(
    ("name", "write", "fault"),
    [
        ("fedavg.npz", good_overlay, "not an overlay file name (<arm>--<trained_on>.npz)"),
        (f"{ARM}.npz", lambda p: overlay(p, truth=np.zeros((4, 4))), "no 'image' array"),
        (f"{ARM}.npz", lambda p: p.write_bytes(np.random.default_rng(0).bytes(999)), "not an overlay file"),
        (f"{ARM}.npz", lambda p: overlay(p, image=np.array([[{}]], dtype=object)), "'image' holds object"),
        (f"{ARM}.npz", lambda p: overlay(p, image=np.zeros((2, 2, 2))), "'image' has 3 dimensions, not 2"),
        (f"{ARM}.npz", lambda p: overlay(p, image=np.zeros((2, 2), complex)), "'image' holds complex128"),
        (f"{ARM}.npz", lambda p: header_only(p, (30000, 30000)), "'image' is 30000 × 30000 pixels, not 1 to 4096"),
        (f"{ARM}.npz", lambda p: header_only(p, (0, 5)), "'image' is 0 × 5 pixels"),
    ],
)
def test_a_bad_overlay_file_names_the_file_and_fault(
    results: Path, name: str, write: Callable[[Path], object], fault: str
) -> None:
    path = results / "overlays" / "site-0--a" / name
    path.parent.mkdir(parents=True)
    write(path)
    raises_naming(lambda: plots.plot_overlays(results, results / "overlays.png"), path, fault)


def test_an_overlay_file_larger_than_its_cap_is_refused_from_its_size(results: Path) -> None:
    path = results / "overlays" / "site-0--a" / f"{ARM}.npz"
    path.parent.mkdir(parents=True)
    with path.open("wb") as handle:
        handle.truncate(plots.MAX_OVERLAY_BYTES + 1)
    raises_naming(lambda: plots.plot_overlays(results, results / "overlays.png"), path, "larger than the 16 MiB")


# ---------------------------------------------------------------------------------------------- 7. cases.csv
@pytest.mark.parametrize(
    ("row", "fault"),
    [
        ("fedavg,federated,federation,site-0,0,a,0.5,sample-level,-1,1e-5", "ε = -1.0 is not a finite number >= 0"),
        ("fedavg,federated,federation,site-0,0,a,0.5,client-level,inf,1e-5", "ε = inf is not a finite number >= 0"),
        ("fedavg,federated,federation,site-0,0,a,0.5,sample-level,1,1.0", "δ = 1.0 is not a number in [0, 1)"),
        ("fedavg,federated,federation,site-0,0,a,0.5,sample-level,1,-1e-5", "δ = -1e-05 is not a number in [0, 1)"),
        ("fedavg,federated,federation,site-0,0,a,0.5,,,1e-5", "delta without dp_kind and epsilon"),
        (
            "fedavg,federated,federation,site-0,yes,a,0.5,,,",
            "outside 'yes' is not one of 0, 1, false, true, False, True",
        ),
        (",federated,federation,site-0,0,a,0.5,,,", "arm is empty"),
        ("fedavg,,federation,site-0,0,a,0.5,,,", "kind is empty"),
        ("fedavg,federated,,site-0,0,a,0.5,,,", "trained_on is empty"),
        ("fedavg,federated,federation,,0,a,0.5,,,", "tested_on is empty"),
        ("fedavg,federated,federation,site-0,0,,0.5,,,", "subject is empty"),
    ],
)
def test_a_cases_row_out_of_range_or_empty_is_refused_naming_line_and_fault(
    tmp_path: Path, row: str, fault: str
) -> None:
    (tmp_path / "cases.csv").write_text(HEADER + row + "\n")
    with pytest.raises(CasesError, match=r"cases.csv, line 2: malformed row \[.*\]: ") as caught:
        read_cases(tmp_path / "cases.csv")
    assert str(caught.value).endswith(fault), caught.value


def test_a_repeated_case_row_is_refused_naming_both_lines(tmp_path: Path) -> None:
    rows = ["fedavg,federated,federation,site-0,0,a,0.5,,,", "fedavg,federated,federation,site-0,0,b,0.1,,,"]
    (tmp_path / "cases.csv").write_text(HEADER + "\n".join([*rows, rows[0].replace("0.5", "0.7")]) + "\n")
    with pytest.raises(CasesError, match=r"cases.csv, line 4: repeats line 2 \(arm fedavg, trained_on federation, "):
        read_cases(tmp_path / "cases.csv")
    (tmp_path / "cases.csv").write_text(HEADER + "\n".join([*rows, rows[0].replace("site-0,0", "outside,1")]) + "\n")
    assert len(read_cases(tmp_path / "cases.csv")) == 3  # the same subject in another test set is another case


def test_a_header_naming_a_column_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "cases.csv").write_text(
        "arm,kind,trained_on,tested_on,outside,subject,dice_1,dice_1\nfedavg,federated,federation,site-0,0,a,0.9,0.1\n"
    )
    with pytest.raises(CasesError, match=r"cases\.csv: the header names column 'dice_1' more than once"):
        read_cases(tmp_path / "cases.csv")


def test_every_outside_spelling_written_so_far_still_reads(tmp_path: Path) -> None:
    rows = [
        f"fedavg,federated,federation,site-0,{v},a{i},0.5,sample-level,1.5,0"
        for i, v in enumerate(("0", "false", "False"))
    ]
    rows += [f"fedavg,federated,federation,outside,{v},b{i},0.5,,," for i, v in enumerate(("1", "true", "True"))]
    (tmp_path / "cases.csv").write_text(HEADER + "\n".join(rows) + "\n")
    assert [row.outside for row in read_cases(tmp_path / "cases.csv")] == [False] * 3 + [True] * 3


def test_committed_cases_files_still_read() -> None:
    root = Path(__file__).parents[1]
    paths = [*root.glob("docs/**/cases.csv"), *root.glob("results/*/cases.csv")]
    assert all(read_cases(path) for path in paths)


# ---------------------------------------------------------------------------------------------- 8. paired t-test
def test_equal_differences_give_a_paired_t_of_p_0_without_a_warning(results: Path) -> None:
    rows = [
        CaseRow(arm, kind, on, "site-0", False, subject, (score,))
        for arm, kind, on, score in (("private", "private", "site-0", 0.5), ("fedavg", "federated", "federation", 0.75))
        for subject in "abc"
    ]  # fmt: skip
    write_cases(results / "cases.csv", rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        test = paired_test(
            ("fedavg", "federation"), ("private", "site-0"), dict.fromkeys("abc", 0.8), dict.fromkeys("abc", 0.5)
        )
        code, output = cli("report", results, "--out", results / "out")
    assert (test.p_wilcoxon, test.p_ttest) == (0.25, 0.0)
    assert code == 0, output
    assert "| fedavg | private | 3 | +0.250 | 0.25 | 0 | 0.25 | 0 |" in (results / "out" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------- 9. many models
def test_a_cases_file_of_more_models_or_test_sets_than_the_bounds_is_refused_naming_count_and_bound(
    tmp_path: Path,
) -> None:
    models, sets = MAX_CASES_MODELS + 1, MAX_CASES_TEST_SETS + 1
    for name, rows, fault in (
        ("models", (f"arm-{i},federated,site-{i},site-0,0,a,0.5,,," for i in range(models)),
         f"{models} models (distinct arm, trained_on), more than the {MAX_CASES_MODELS} a cases file may have"),
        ("test-sets", (f"fedavg,federated,federation,site-{i},0,a,0.5,,," for i in range(sets)),
         f"{sets} test sets (distinct tested_on), more than the {MAX_CASES_TEST_SETS} a cases file may have"),
    ):  # fmt: skip
        path = tmp_path / name / "cases.csv"
        path.parent.mkdir()
        path.write_text(HEADER + "\n".join(rows) + "\n")
        raises_naming(lambda path=path: read_cases(path), path, fault)
        code, output = cli("report", path.parent, "--out", tmp_path / f"{name}-out")
        refused(code, output, path)
        assert len(output.strip().splitlines()) == 1 and fault in output, output
    at_bounds = [
        f"arm-{i},federated,site-{i},site-{i % MAX_CASES_TEST_SETS},0,a,0.5,,," for i in range(MAX_CASES_MODELS)
    ]
    (tmp_path / "cases.csv").write_text(HEADER + "\n".join(at_bounds) + "\n")
    assert len(read_cases(tmp_path / "cases.csv")) == MAX_CASES_MODELS


def test_too_many_paired_tests_are_refused_naming_the_files(tmp_path: Path) -> None:
    """Each private model is paired with each compared one: quadratic in the models, so bounded apart."""
    private = MAX_PAIRED_TESTS // 100 + 1
    rows = [f"private,private,site-{i},site-0,0,a,0.5,,," for i in range(private)]
    rows += [f"fed-{i},federated,federation,site-0,0,a,0.5,,," for i in range(100)]
    path = tmp_path / "run" / "cases.csv"
    path.parent.mkdir()
    path.write_text(HEADER + "\n".join(rows) + "\n")
    fault = f"100 models to pair with each of {private} private models, {100 * private} paired tests, more than the"
    code, output = cli("report", path.parent, "--out", tmp_path / "out")
    refused(code, output, path)
    assert len(output.strip().splitlines()) == 1 and fault in output and output.startswith(f"error: {path}"), output


def many_models(arms: int) -> list[CaseRow]:
    """Rows of `arms` arms of every compared kind, of two models each (private, personal: one per site), on
    two internal test sets and the outside institution, some with DP, two structures."""
    kinds = ("private", "federated", "personal", "centralized", "cyclic", "finetuned")
    rows = []
    for a in range(arms):
        kind = kinds[a % len(kinds)]
        dp = ("sample-level", 1.0 + a, 1e-5) if kind == "federated" and a % 4 == 1 else ("", math.nan, math.nan)
        for s in range(2):
            trained_on = f"site-{s}" if kind in ("private", "personal", "finetuned") else f"federation-{s}"
            tested = [f"site-{s}"] if kind == "personal" else ["site-0", "site-1", "outside"]
            for tested_on in tested:
                for subject in "abc":
                    score = (a * 7 + s * 3 + ord(subject)) % 10 / 10
                    rows.append(CaseRow(f"arm-{a}", kind, trained_on, tested_on, tested_on == "outside", subject,
                                        (score, 1 - score), *dp))  # fmt: skip
    return rows


def counted_passes(call: Callable[[list[CaseRow]], object], arms: int) -> int:
    rows = CountedRows(many_models(arms))
    call(rows)
    return rows.passes


TABLES: dict[str, Callable[[list[CaseRow]], object]] = {
    "cross_site_matrix": tables.cross_site_matrix,
    "arm_summaries": tables.arm_summaries,
    "structure_summaries": lambda rows: tables.structure_summaries(rows, ["1", "2"]),
    "privacy_points": tables.privacy_points,
    "privacy_references": tables.privacy_references,
    "model_labels": tables.model_labels,
    "model_kinds": tables.model_kinds,
    "model_pairs": lambda rows: tables.model_pairs(rows, "centralized"),
    "paired_tests": lambda rows: tables.paired_tests(rows, "private", outside=True),
    "matrix_table": summary.matrix_table,
    "arms_table": summary.arms_table,
    "structure_table": lambda rows: summary.structure_table(rows, ["1", "2"]),
    "paired_table": lambda rows: summary.paired_table(rows, "centralized"),
    "privacy_table": summary.privacy_table,
}


@pytest.mark.parametrize("name", TABLES)
def test_each_table_passes_over_the_rows_a_few_times_however_many_models(name: str) -> None:
    """Not once per arm or model: (models × rows) took 31 s for 2000 rows of an arm each."""
    few, many = counted_passes(TABLES[name], 6), counted_passes(TABLES[name], 36)
    assert many == few <= 12, (few, many)


def test_a_whole_report_passes_over_each_runs_rows_a_few_times_however_many_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """build_report, the seeds report and the --against report, the row lists they read or pool counted."""
    lists: list[CountedRows] = []

    def counted(rows: list[CaseRow]) -> CountedRows:
        lists.append(CountedRows(rows))
        return lists[-1]

    monkeypatch.setattr(summary, "read_cases", lambda path: counted(read_cases(path)))
    monkeypatch.setattr(seeds, "read_cases", lambda path: counted(read_cases(path)))
    for module in (seeds, summary, against):  # the runs' rows pooled
        monkeypatch.setattr(module, "run_rows", lambda runs: counted([row for run in runs for row in run.rows]))
    monkeypatch.setattr(summary, "_plots", lambda *args: "")  # the plots: counted in section 2

    def passes(arms: int) -> list[int]:
        folders = []
        for name in ("a", "b", "c"):
            folders.append(tmp_path / f"{arms}" / name)
            folders[-1].mkdir(parents=True)
            write_cases(folders[-1] / "cases.csv", many_models(arms))
        counts = []
        for build in (
            lambda: summary.build_report(folders[0], tmp_path / f"{arms}" / "one"),
            lambda: summary.build_seed_report(folders[:2], tmp_path / f"{arms}" / "seeds"),
            lambda: against.build_against_report(folders[:2], folders[2:], tmp_path / f"{arms}" / "against"),
        ):
            lists.clear()
            build()
            counts.append(sum(rows.passes for rows in lists))
        return counts

    few, many = passes(6), passes(36)
    assert many == few and max(few) <= 200, (few, many)
