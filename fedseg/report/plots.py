"""PNG plots of an experiment (matplotlib, Agg backend): curves, heatmap, box plots, Dice vs ε, overlays."""

from __future__ import annotations

import lzma
import math
import zipfile
import zlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path
from typing import IO

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from fedseg.json_records import read_json_object, record_float, record_int
from fedseg.report.cases import CaseRow, CasesError
from fedseg.report.layout import ARM_INFO, ARMS, FEDERATION, HISTORY, OVERLAYS, ArmInfo
from fedseg.report.tables import Cell, Model, PrivacyPoint, model_labels, models, test_sets

DPI = 80
OVERLAY_DPI = 60  # many panels: keep the PNG small
MAX_TEST_SETS = 16  # test sets a plot draws (heatmap columns, box-plot panels); experiments have about 11
MAX_MODELS = 64  # models a plot draws (heatmap rows, boxes of a panel, overlay panels); experiments have about 33
OVERLAY_KEYS = ("image", "truth", "prediction")  # the arrays of an overlay file (fedseg.experiments.evaluation)
MAX_OVERLAY_BYTES = 16 * 2**20  # an overlay file (one 240 × 240 slice of the three takes about 100 kB)
MAX_OVERLAY_SIDE = 4096  # pixels along each side of an overlay slice
OVERLAY_PIXELS = 256  # pixels along each side drawn: a larger slice is subsampled (a panel is 120 pixels wide)


@dataclass(frozen=True)
class Curve:
    """Per-round mean test Dice of one federated/cyclic arm, with its cumulative cost."""

    label: str
    rounds: list[int]
    dice: list[float]
    megabytes: list[float]  # cumulative: 2 × model bytes × participating sites per round
    seconds: list[float]  # cumulative wall time


def load_curves(results_dir: Path, keep: Collection[Model]) -> list[Curve]:
    """Curves of the models in `keep` whose arm folder holds a history.json."""
    curves = []
    for folder in sorted((results_dir / ARMS).glob("*")):
        if not (folder / HISTORY).is_file() or not (folder / ARM_INFO).is_file():
            continue
        info = ArmInfo.load(folder)
        if (info.arm, info.trained_on) not in keep:
            continue
        label = info.arm if info.trained_on == FEDERATION else f"{info.arm} ({info.trained_on})"
        curves.append(_curve(folder / HISTORY, label, info.model_bytes))
    return curves


def _curve(path: Path, label: str, model_bytes: int) -> Curve:
    """The run history's curve; CasesError naming the file (and the value) when it is not one."""
    try:
        rounds = read_json_object(path)["rounds"]
        if not isinstance(rounds, list):
            raise TypeError("rounds is not a list")
        points = [_round_point(path, index, record) for index, record in enumerate(rounds)]
    except (KeyError, TypeError) as err:
        raise CasesError(f"{path}: not a run history ({type(err).__name__})") from None
    except ValueError as err:
        raise CasesError(str(err)) from None
    return Curve(
        label=label,
        rounds=[number for number, _, _, _ in points],
        dice=[dice for _, dice, _, _ in points],
        megabytes=np.cumsum([2 * model_bytes * sites / 1e6 for _, _, sites, _ in points]).tolist(),
        seconds=np.cumsum([seconds for _, _, _, seconds in points]).tolist(),
    )


def _round_point(path: Path, index: int, record: object) -> tuple[int, float, int, float]:
    """(round, mean test Dice, sites trained, seconds) of the history's `index`-th round record; KeyError or
    TypeError when it is not a round record, ValueError naming the value out of range."""
    if not isinstance(record, dict) or not isinstance(record.get("train", {}), dict):
        raise TypeError(f"rounds[{index}] is not a round record")
    key = f"rounds[{index}]"
    return (
        record_int(path, f"{key}.round", record["round"]),
        record_float(path, f"{key}.mean_dice", record["mean_dice"], 1.0, nan=True),
        len(record.get("train", {})),
        record_float(path, f"{key}.seconds", record["seconds"]),
    )


def plot_rounds(curves: Sequence[Curve], path: Path, reference: float = math.nan) -> None:
    """Mean test Dice vs round per strategy; dashed line: the centralized arm's final Dice."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for curve in curves:
        ax.plot(curve.rounds, curve.dice, marker="o", label=curve.label)
    if not math.isnan(reference):
        ax.axhline(reference, linestyle="--", color="black", label="centralized")
    ax.set(xlabel="round", ylabel="mean test Dice", title="Dice vs round", ylim=(0, 1))
    _finish(fig, ax, path)


def plot_cost(curves: Sequence[Curve], path: Path) -> None:
    """Mean test Dice vs megabytes sent (left) and vs wall time (right)."""
    fig, (by_bytes, by_time) = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for curve in curves:
        by_bytes.plot(curve.megabytes, curve.dice, marker="o", label=curve.label)
        by_time.plot(curve.seconds, curve.dice, marker="o", label=curve.label)
    by_bytes.set(xlabel="MB sent (server ↔ sites)", ylabel="mean test Dice", ylim=(0, 1), title="Dice vs bytes sent")
    by_time.set(xlabel="wall time (s)", title="Dice vs wall time")
    _finish(fig, by_time, path)


def plot_heatmap(rows: Sequence[CaseRow], matrix: dict[Model, dict[str, Cell]], path: Path) -> None:
    """Cross-site matrix of mean Dice (trained-on rows × tested-on columns; the first MAX_MODELS and
    MAX_TEST_SETS, the title says how many more there are)."""
    all_models, all_columns = models(rows), test_sets(rows)
    row_models, columns = all_models[:MAX_MODELS], all_columns[:MAX_TEST_SETS]
    labels = model_labels(rows)
    values = np.array([[matrix[m][c].mean if c in matrix[m] else np.nan for c in columns] for m in row_models])
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.45 * len(row_models) + 1.5))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(row_models)), [labels[m] for m in row_models])
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    title = "mean Dice: trained on × tested on"
    ax.set(xlabel="tested on", title=title + _left_out(len(all_models), len(all_columns)))
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_boxes(rows: Sequence[CaseRow], path: Path) -> None:
    """Per tested-on set, a box of per-case Dice for each model (the first MAX_TEST_SETS and MAX_MODELS; the
    figure's title says how many more there are)."""
    all_models, all_columns = models(rows), test_sets(rows)
    columns, order = all_columns[:MAX_TEST_SETS], {m: i for i, m in enumerate(all_models[:MAX_MODELS])}
    labels = model_labels(rows)
    scores: dict[str, dict[Model, list[float]]] = {column: {} for column in columns}
    for row in rows:  # once over the rows: a panel per test set must not scan them all again
        if row.tested_on in scores and row.model in order:
            panel, score = scores[row.tested_on].setdefault(row.model, []), row.score
            if not math.isnan(score):
                panel.append(score)
    fig, axes = plt.subplots(1, len(columns), figsize=(3 + 2.2 * len(columns), 4), sharey=True, squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        present = sorted(scores[column], key=order.__getitem__)
        ax.boxplot([scores[column][m] for m in present])
        ax.set_xticks(range(1, len(present) + 1), [labels[m] for m in present], rotation=60, ha="right")
        ax.set_title(f"tested on {column}")
    axes[0][0].set(ylabel="per-case Dice", ylim=(0, 1))
    note = _left_out(len(all_models), len(all_columns))
    if note:
        fig.suptitle(note.strip())
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_privacy(points: Sequence[PrivacyPoint], references: dict[str, Cell], path: Path) -> None:
    """Mean internal-test Dice (± sd) vs final ε per DP kind; dashed lines: models trained without DP (the
    first MAX_MODELS, the title says how many more there are)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for kind in dict.fromkeys(p.dp_kind for p in points):
        shown = [p for p in points if p.dp_kind == kind and math.isfinite(p.epsilon)]
        ax.errorbar(
            [p.epsilon for p in shown],
            [p.internal.mean for p in shown],
            yerr=[0.0 if math.isnan(p.internal.sd) else p.internal.sd for p in shown],
            marker="o",
            capsize=3,
            label=f"{kind} DP",
        )
    lines = list(references.items())[:MAX_MODELS]  # a line and a legend entry each
    for (label, cell), style in zip(lines, cycle(("--", ":", "-."))):
        ax.axhline(cell.mean, linestyle=style, color="black", linewidth=1, label=f"{label} (no DP)")
    epsilons = [p.epsilon for p in points if math.isfinite(p.epsilon) and p.epsilon > 0]
    if epsilons and max(epsilons) > 10 * min(epsilons):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    title = "Dice vs privacy"
    if len(lines) < len(references):
        title += f"\n(the first {MAX_MODELS} of {len(references)} models without DP shown)"
    ax.set(xlabel="ε (final, at the model's δ)", ylabel="mean test Dice (± sd)", title=title, ylim=(0, 1))
    _finish(fig, ax, path)


def plot_overlays(results_dir: Path, path: Path, max_cases: int = 3) -> bool:
    """Image, truth and each model's prediction (the first MAX_MODELS) on one slice of a few cases; False if
    none saved. CasesError naming an overlay file that is not one (`read_overlay`)."""
    cases = sorted(p for p in (results_dir / OVERLAYS).glob("*") if p.is_dir())[:max_cases]
    panels = [sorted(case.glob("*.npz")) for case in cases]
    shown = [(case, files) for case, files in zip(cases, panels, strict=True) if files]
    if not shown:
        return False
    most = max(len(files) for _, files in shown)
    width = 2 + min(most, MAX_MODELS)
    fig, axes = plt.subplots(len(shown), width, figsize=(2 * width, 2.1 * len(shown)), squeeze=False)
    for ax_row, (case, files) in zip(axes, shown, strict=True):
        image, truth = read_overlay(files[0], "image", "truth")
        ax_row[0].imshow(image.T, cmap="gray", origin="lower", interpolation="nearest")
        ax_row[0].set_title(case.name, fontsize=7)
        _label_panel(ax_row[1], image, truth, "truth")
        for ax, file in zip(ax_row[2:], files, strict=False):  # a row has a panel per model of the widest case
            arm, trained_on = _overlay_model(file)
            _label_panel(ax, image, read_overlay(file, "prediction")[0], f"{arm}\n{trained_on}")
        for ax in ax_row:
            ax.axis("off")
    if most > MAX_MODELS:
        fig.suptitle(f"the first {MAX_MODELS} of {most} models shown")
    fig.tight_layout()
    fig.savefig(path, dpi=OVERLAY_DPI)
    plt.close(fig)
    return True


def read_overlay(path: Path, *keys: str) -> list[np.ndarray]:
    """The arrays `keys` of an overlay file, each checked from its .npy header inside the zip before it is
    loaded (`_check_header`), without pickles, and subsampled to at most OVERLAY_PIXELS a side; CasesError
    naming the file and the fault."""
    try:
        if path.stat().st_size > MAX_OVERLAY_BYTES:
            raise CasesError(f"{path}: larger than the {MAX_OVERLAY_BYTES // 2**20} MiB an overlay file may have")
        with zipfile.ZipFile(path) as archive:
            return [_subsampled(_overlay_array(path, archive, key)) for key in keys]
    except CasesError:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, zipfile.BadZipFile, zlib.error, lzma.LZMAError) as err:
        raise CasesError(f"{path}: not an overlay file ({type(err).__name__})") from None


def _overlay_array(path: Path, archive: zipfile.ZipFile, key: str) -> np.ndarray:
    name = f"{key}.npy"
    if name not in archive.namelist():
        raise CasesError(f"{path}: no '{key}' array (an overlay file holds {', '.join(OVERLAY_KEYS)})")
    with archive.open(name) as member:
        _check_header(path, key, member)
    with archive.open(name) as member:
        return np.lib.format.read_array(member, allow_pickle=False)


def _check_header(path: Path, key: str, member: IO[bytes]) -> None:
    """CasesError unless the .npy header in `member` describes a 2-D array of numbers (no objects), at most
    MAX_OVERLAY_SIDE pixels a side."""
    version = np.lib.format.read_magic(member)
    if version not in ((1, 0), (2, 0)):
        raise CasesError(f"{path}: '{key}' is a .npy array of version {version}, not 1.0 or 2.0")
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(member)
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise CasesError(f"{path}: '{key}' holds {dtype}, not real numbers")
    if len(shape) != 2:
        raise CasesError(f"{path}: '{key}' has {len(shape)} dimensions, not 2 (one slice)")
    if not all(0 < side <= MAX_OVERLAY_SIDE for side in shape):
        raise CasesError(f"{path}: '{key}' is {shape[0]} × {shape[1]} pixels, not 1 to {MAX_OVERLAY_SIDE} a side")


def _subsampled(array: np.ndarray) -> np.ndarray:
    """Every step-th pixel along both axes, at most OVERLAY_PIXELS a side (a panel is far smaller)."""
    step = -(-max(array.shape) // OVERLAY_PIXELS)
    return np.ascontiguousarray(array[::step, ::step])


def _overlay_model(path: Path) -> tuple[str, str]:
    """(arm, trained_on) from an overlay file's name, `<arm>--<trained_on>.npz`; CasesError otherwise."""
    arm, separator, trained_on = path.stem.partition("--")
    if not (arm and separator and trained_on):
        raise CasesError(f"{path}: not an overlay file name (<arm>--<trained_on>.npz)")
    return arm, trained_on


def _label_panel(ax: plt.Axes, image: np.ndarray, labels: np.ndarray, title: str) -> None:
    ax.imshow(image.T, cmap="gray", origin="lower", interpolation="nearest")
    ax.imshow(
        np.ma.masked_equal(labels, 0).T,
        cmap="autumn",
        alpha=0.5,
        origin="lower",
        vmin=0,
        vmax=3,
        interpolation="nearest",
    )
    ax.set_title(title, fontsize=7)


def _left_out(models: int, test_sets: int) -> str:
    """A title's note on how many models and test sets a plot leaves out (beyond MAX_MODELS and
    MAX_TEST_SETS), on a line of its own; "" when it draws them all."""
    counts = ((models, MAX_MODELS, "models"), (test_sets, MAX_TEST_SETS, "test sets"))
    cut = [f"the first {limit} of {total} {what}" for total, limit, what in counts if total > limit]
    return f"\n({' and '.join(cut)} shown)" if cut else ""


def _finish(fig: plt.Figure, legend_ax: plt.Axes, path: Path) -> None:
    legend_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
