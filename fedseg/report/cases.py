"""`cases.csv`: one row per (arm, trained-on, tested-on, subject) with the Dice of each class.

Columns: `arm` (e.g. private, centralized, fedavg), `kind` (private, centralized, federated,
cyclic, leave-one-out, finetuned, ensemble), `trained_on` (a site, `pooled`, `federation`,
`without-site-1`, ...), `tested_on` (a site's held-out test split, or the outside institution),
`outside` (1 for the outside institution, else 0; true/false also read), `subject` (no name empty),
then `dice_1`, `dice_2`, ... (foreground classes; empty where a class is absent from the truth) or,
with the BraTS label scheme, `dice_WT`, `dice_TC`, `dice_ET` (tumour regions; BraTS rule for empty
regions, see fedseg.labels), then the model's privacy guarantee: `dp_kind` (`sample-level`: DP-SGD at
the sites, protects one subject's scans at a site; `client-level`: the dp-noised strategy, protects a
whole site's participation), `epsilon` and `delta` (final cumulative ε >= 0 at δ in [0, 1); for DP-SGD
the largest ε over the sites). All three are empty for a model trained without DP; files without these
columns read as no DP.
"""

from __future__ import annotations

import csv
import math
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

from fedseg.atomic import atomic_path
from fedseg.dp_budget import budget_fault
from fedseg.limits import MAX_CASES_BYTES

KEY_COLUMNS = ("arm", "kind", "trained_on", "tested_on", "outside", "subject")
NAME_COLUMNS = ("arm", "kind", "trained_on", "tested_on", "subject")  # names the reports print
DICE_PREFIX = "dice_"
PRIVACY_COLUMNS = ("dp_kind", "epsilon", "delta")  # optional (absent in older files)
SAMPLE_LEVEL, CLIENT_LEVEL = "sample-level", "client-level"
DP_KINDS = (SAMPLE_LEVEL, CLIENT_LEVEL)
OUTSIDE_VALUES = {"0": False, "1": True, "false": False, "true": True, "False": False, "True": True}
# A report prints a cross-site row and paired tests per model and a column per test set, so a cases file with
# more than these is refused when read. Experiments so far: at most 58 models and 51 test sets. At both bounds
# and the size cap (4 million rows) a report took 9 minutes and 2.4 GB and wrote a 50 MB report.md.
MAX_CASES_MODELS = 5000  # distinct models (arm, trained_on) of one cases file
MAX_CASES_TEST_SETS = 500  # distinct test sets (tested_on) of one cases file


class CasesError(ValueError):
    """cases.csv is missing, empty or malformed; the message names the file and the fault."""


@dataclass(frozen=True, slots=True)  # slots: a cases file at its cap holds millions of rows
class CaseRow:
    """Dice of one test subject under one trained model."""

    arm: str
    kind: str
    trained_on: str
    tested_on: str
    outside: bool
    subject: str
    dice: tuple[float, ...]
    dp_kind: str = ""  # "", SAMPLE_LEVEL or CLIENT_LEVEL
    epsilon: float = math.nan  # final ε of the model at `delta` (NaN without DP)
    delta: float = math.nan

    @property
    def model(self) -> tuple[str, str]:
        """(arm, trained_on): one trained model (or ensemble)."""
        return (self.arm, self.trained_on)

    @property
    def score(self) -> float:
        """Mean Dice over the classes present (NaN when no class is present)."""
        values = [d for d in self.dice if not math.isnan(d)]
        return sum(values) / len(values) if values else math.nan


def write_cases(path: Path, rows: Iterable[CaseRow], structures: Sequence[str] | None = None) -> None:
    """Write rows as CSV (header included); one Dice column per scored structure (default: classes
    1, 2, … as many as the rows have)."""
    rows = list(rows)
    if structures is None:
        structures = [str(i) for i in range(1, max((len(r.dice) for r in rows), default=0) + 1)]
    header = [*KEY_COLUMNS, *(f"{DICE_PREFIX}{name}" for name in structures), *PRIVACY_COLUMNS]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            dice = ["" if math.isnan(d) else f"{d:.6f}" for d in row.dice]
            privacy = [row.dp_kind, _optional(row.epsilon, "{!r}"), _optional(row.delta, "{!r}")]
            writer.writerow(
                [row.arm, row.kind, row.trained_on, row.tested_on, int(row.outside), row.subject, *dice, *privacy]
            )


def read_cases(path: Path) -> list[CaseRow]:
    """Rows of a cases.csv; raise CasesError naming the file, line and problem."""
    try:
        with _open(path) as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise CasesError(f"{path}: empty file (expected a header row)")
            missing = [c for c in KEY_COLUMNS if c not in header]
            dice_cols = [i for i, name in enumerate(header) if name.startswith(DICE_PREFIX)]
            if missing or not dice_cols:
                raise CasesError(f"{path}: header lacks {missing or 'dice_<class> columns'}; got {header}")
            repeated = sorted({name for name in header if header.count(name) > 1})
            if repeated:
                raise CasesError(f"{path}: the header names column '{repeated[0]}' more than once")
            index = {name: header.index(name) for name in (*KEY_COLUMNS, *PRIVACY_COLUMNS) if name in header}
            rows = [_parse(path, line_no, values, index, dice_cols) for line_no, values in enumerate(reader, start=2)]
    except OSError as err:
        raise CasesError(f"{path}: cannot read cases file: {err}") from err
    except (UnicodeDecodeError, csv.Error) as err:
        raise CasesError(f"{path}: not a CSV text file: {err}") from err
    if not rows:
        raise CasesError(f"{path}: no result rows")
    _check_breadth(path, rows)
    _check_unique(path, rows)
    return rows


def _check_unique(path: Path, rows: Sequence[CaseRow]) -> None:
    """CasesError naming the file and both lines when a model scored one subject of a test set twice."""
    seen: dict[tuple[str, str, str, str], int] = {}
    for line_no, row in enumerate(rows, start=2):
        first = seen.setdefault((row.arm, row.trained_on, row.tested_on, row.subject), line_no)
        if first != line_no:
            raise CasesError(
                f"{path}, line {line_no}: repeats line {first} (arm {row.arm}, trained_on {row.trained_on}, "
                f"tested_on {row.tested_on}, subject {row.subject}): each model scores a subject once"
            )


def _check_breadth(path: Path, rows: Sequence[CaseRow]) -> None:
    """CasesError naming the file, the count and the bound when the rows hold more than MAX_CASES_MODELS
    models or MAX_CASES_TEST_SETS test sets."""
    models = {row.model for row in rows}
    if len(models) > MAX_CASES_MODELS:
        raise CasesError(
            f"{path}: {len(models)} models (distinct arm, trained_on), more than the {MAX_CASES_MODELS} "
            "a cases file may have"
        )
    test_sets = {row.tested_on for row in rows}
    if len(test_sets) > MAX_CASES_TEST_SETS:
        raise CasesError(
            f"{path}: {len(test_sets)} test sets (distinct tested_on), more than the {MAX_CASES_TEST_SETS} "
            "a cases file may have"
        )


def read_structures(path: Path) -> tuple[str, ...]:
    """Names of the scored structures in a cases.csv header (`dice_1` → "1", `dice_WT` → "WT")."""
    try:
        with _open(path) as handle:
            header = next(csv.reader(handle), [])
    except OSError as err:
        raise CasesError(f"{path}: cannot read cases file: {err}") from err
    return tuple(name[len(DICE_PREFIX) :] for name in header if name.startswith(DICE_PREFIX))


def _open(path: Path) -> TextIO:
    """The cases file opened for csv; CasesError when it is larger than any experiment writes."""
    if Path(path).stat().st_size > MAX_CASES_BYTES:
        raise CasesError(f"{path}: larger than the {MAX_CASES_BYTES // 2**20} MiB a cases file may have")
    return Path(path).open(newline="")


def _optional(value: float, fmt: str) -> str:
    return "" if math.isnan(value) else fmt.format(value)


def _parse(path: Path, line_no: int, values: list[str], index: dict[str, int], dice_cols: list[int]) -> CaseRow:
    def number(column: str) -> float:
        return float(values[index[column]]) if column in index and values[index[column]] != "" else math.nan

    try:
        dice = tuple(float(values[i]) if values[i] != "" else math.nan for i in dice_cols)
        if any(not 0.0 <= d <= 1.0 for d in dice if not math.isnan(d)):
            raise ValueError("a Dice value outside [0, 1]")
        dp_kind = values[index["dp_kind"]] if "dp_kind" in index else ""
        _check_privacy(dp_kind, number("epsilon"), number("delta"))
        for column in NAME_COLUMNS:  # a line break or control character would break every report's lines
            text = values[index[column]]
            if not text:
                raise ValueError(f"{column} is empty")
            if not text.isprintable():
                raise ValueError(f"{column} {text!r} has a line break or other non-printable character")
        outside = values[index["outside"]]
        if outside not in OUTSIDE_VALUES:
            raise ValueError(f"outside {outside!r} is not one of {', '.join(OUTSIDE_VALUES)}")
        return CaseRow(  # the names repeat on many rows: one string each, not one per row
            arm=sys.intern(values[index["arm"]]),
            kind=sys.intern(values[index["kind"]]),
            trained_on=sys.intern(values[index["trained_on"]]),
            tested_on=sys.intern(values[index["tested_on"]]),
            outside=OUTSIDE_VALUES[outside],
            subject=sys.intern(values[index["subject"]]),
            dice=dice,
            dp_kind=sys.intern(dp_kind),
            epsilon=number("epsilon"),
            delta=number("delta"),
        )
    except (IndexError, ValueError) as err:
        raise CasesError(f"{path}, line {line_no}: malformed row {values}: {err}") from err


def _check_privacy(dp_kind: str, epsilon: float, delta: float) -> None:
    """ValueError unless (dp_kind, ε, δ) is a model trained without DP (all empty) or a DP guarantee: a DP
    kind, a finite ε >= 0 and δ in [0, 1) or empty (fedseg.dp_budget)."""
    if dp_kind not in ("", *DP_KINDS):
        raise ValueError(f"dp_kind {dp_kind!r} is not one of {', '.join(DP_KINDS)} (or empty)")
    if bool(dp_kind) != (not math.isnan(epsilon)):
        raise ValueError("dp_kind and epsilon must be both set or both empty")
    if not dp_kind:
        if not math.isnan(delta):
            raise ValueError("delta without dp_kind and epsilon")
        return
    fault = budget_fault(epsilon, 0.0 if math.isnan(delta) else delta)
    if fault:
        raise ValueError(fault)


def mean_sd(values: Sequence[float]) -> tuple[float, float, int]:
    """(mean, sample sd, n) of the non-NaN values; NaN where undefined (sd needs n >= 2)."""
    array = np.asarray([v for v in values if not math.isnan(v)], dtype=float)
    if array.size == 0:
        return math.nan, math.nan, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        sd = float(np.std(array, ddof=1)) if array.size > 1 else math.nan
    return float(array.mean()), sd, int(array.size)
