"""PNG plots of an experiment (matplotlib, Agg backend): curves, heatmap, box plots, Dice vs ε, overlays."""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import cycle
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import NullFormatter

from fedseg.report.cases import CaseRow, CasesError
from fedseg.report.layout import ARM_INFO, ARMS, HISTORY, OVERLAYS, ArmInfo
from fedseg.report.tables import Cell, Model, PrivacyPoint, model_label, models, test_sets

DPI = 80
OVERLAY_DPI = 60  # many panels: keep the PNG small


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
        label = info.arm if info.trained_on == "federation" else f"{info.arm} ({info.trained_on})"
        try:
            rounds = json.loads((folder / HISTORY).read_text())["rounds"]
            sent = np.cumsum([2 * info.model_bytes * len(r.get("train", {})) / 1e6 for r in rounds])
            curve = Curve(
                label=label,
                rounds=[int(r["round"]) for r in rounds],
                dice=[float(r["mean_dice"]) for r in rounds],
                megabytes=sent.tolist(),
                seconds=np.cumsum([float(r["seconds"]) for r in rounds]).tolist(),
            )
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:
            raise CasesError(f"{folder / HISTORY}: not a run history ({type(err).__name__})") from None
        curves.append(curve)
    return curves


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
    """Cross-site matrix of mean Dice (trained-on rows × tested-on columns)."""
    row_models, columns = models(rows), test_sets(rows)
    values = np.array([[matrix[m][c].mean if c in matrix[m] else np.nan for c in columns] for m in row_models])
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 3, 0.45 * len(row_models) + 1.5))
    image = ax.imshow(values, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=30, ha="right")
    ax.set_yticks(range(len(row_models)), [model_label(m, rows) for m in row_models])
    for (i, j), value in np.ndenumerate(values):
        if not np.isnan(value):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="white" if value < 0.6 else "black")
    ax.set(xlabel="tested on", title="mean Dice: trained on × tested on")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_boxes(rows: Sequence[CaseRow], path: Path) -> None:
    """Per tested-on set, a box of per-case Dice for each model."""
    columns, row_models = test_sets(rows), models(rows)
    fig, axes = plt.subplots(1, len(columns), figsize=(3 + 2.2 * len(columns), 4), sharey=True, squeeze=False)
    for ax, column in zip(axes[0], columns, strict=True):
        present = [m for m in row_models if any(r.model == m and r.tested_on == column for r in rows)]
        data = [
            [r.score for r in rows if r.model == m and r.tested_on == column and not math.isnan(r.score)]
            for m in present
        ]
        ax.boxplot(data)
        ax.set_xticks(range(1, len(present) + 1), [model_label(m, rows) for m in present], rotation=60, ha="right")
        ax.set_title(f"tested on {column}")
    axes[0][0].set(ylabel="per-case Dice", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def plot_privacy(points: Sequence[PrivacyPoint], references: dict[str, Cell], path: Path) -> None:
    """Mean internal-test Dice (± sd) vs final ε per DP kind; dashed lines: models trained without DP."""
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
    for (label, cell), style in zip(references.items(), cycle(("--", ":", "-."))):
        ax.axhline(cell.mean, linestyle=style, color="black", linewidth=1, label=f"{label} (no DP)")
    epsilons = [p.epsilon for p in points if math.isfinite(p.epsilon) and p.epsilon > 0]
    if epsilons and max(epsilons) > 10 * min(epsilons):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel="ε (final, at the model's δ)", ylabel="mean test Dice (± sd)", title="Dice vs privacy", ylim=(0, 1))
    _finish(fig, ax, path)


def plot_overlays(results_dir: Path, path: Path, max_cases: int = 3) -> bool:
    """Image, truth and each model's prediction on one slice of a few cases; False if none saved."""
    cases = sorted(p for p in (results_dir / OVERLAYS).glob("*") if p.is_dir())[:max_cases]
    panels = [sorted(case.glob("*.npz")) for case in cases]
    shown = [(case, files) for case, files in zip(cases, panels, strict=True) if files]
    if not shown:
        return False
    width = 2 + max(len(files) for _, files in shown)
    fig, axes = plt.subplots(len(shown), width, figsize=(2 * width, 2.1 * len(shown)), squeeze=False)
    for ax_row, (case, files) in zip(axes, shown, strict=True):
        first = np.load(files[0])
        ax_row[0].imshow(first["image"].T, cmap="gray", origin="lower", interpolation="nearest")
        ax_row[0].set_title(case.name, fontsize=7)
        _label_panel(ax_row[1], first["image"], first["truth"], "truth")
        for ax, file in zip(ax_row[2:], files, strict=False):  # a row has a panel per model of the widest case
            arm, trained_on = file.stem.split("--", 1)
            _label_panel(ax, first["image"], np.load(file)["prediction"], f"{arm}\n{trained_on}")
        for ax in ax_row:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=OVERLAY_DPI)
    plt.close(fig)
    return True


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


def _finish(fig: plt.Figure, legend_ax: plt.Axes, path: Path) -> None:
    legend_ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
