"""Testing an experiment's models: per-case Dice of each arm's model (or ensemble) on the sites' held-out
test splits and the outside institution, the arm's final (ε, δ), overlay slices, and cases.csv."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset

from fedseg.data.datalist import SiteSplit, load_datalist
from fedseg.data.datasets import evaluation_dataset
from fedseg.dp_budget import budget_fault
from fedseg.enhancing import smallest_threshold
from fedseg.errors import first_line
from fedseg.experiments.arms import Arm
from fedseg.experiments.spec import ExperimentSpec
from fedseg.json_records import read_json_object
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.model_spec import intensity_window
from fedseg.personal_mix import ensemble_mean
from fedseg.privacy import client_epsilon, site_epsilons
from fedseg.report.cases import CLIENT_LEVEL, SAMPLE_LEVEL, CaseRow, read_cases, write_cases
from fedseg.report.layout import ARMS, CASES, HISTORY, OVERLAYS, overlay_case


class ExperimentError(RuntimeError):
    """The experiment cannot run or continue (e.g. its results folder belongs to another config)."""


@dataclass(frozen=True)
class TestSet:
    """A held-out test split of a site, or the whole outside institution."""

    name: str
    outside: bool
    items: list[dict]
    dataset: Dataset


Privacy = tuple[str, float, float]  # (dp_kind, ε, δ); ("", nan, nan) without DP


def arm_privacy(folder: Path) -> Privacy:
    """The final (ε, δ) of the arm's run from its history.json: client-level, or the largest sample-level ε."""
    path = folder / HISTORY
    try:
        history = read_json_object(path) if path.is_file() else {}  # capped: fedseg.limits.MAX_RECORD_BYTES
        client, sites = client_epsilon(history), site_epsilons(history)
    except (OSError, ValueError, TypeError, AttributeError, KeyError, RecursionError) as err:
        raise ExperimentError(f"{path}: not a run history ({type(err).__name__}: {first_line(err)})") from None
    for epsilon, delta in [*([client] if client is not None else []), *sites.values()]:
        fault = budget_fault(epsilon, delta)
        if fault:
            raise ExperimentError(f"{path}: not a privacy guarantee: {fault}")
    if client is not None and sites:
        raise ExperimentError(f"{path}: both DP-SGD and client-level DP; cases.csv records one DP kind per model")
    if client is not None:
        return (CLIENT_LEVEL, *client)
    if sites:
        return (SAMPLE_LEVEL, *max(sites.values()))
    return ("", math.nan, math.nan)


def test_sets(spec: ExperimentSpec, splits: Sequence[SiteSplit]) -> list[TestSet]:
    """Every site's held-out test split, then the outside institution (when the spec names one)."""
    sets = [_test_set(spec, f"site-{k}", False, s.test) for k, s in enumerate(splits)]
    if spec.outside_dir is not None:
        sets.append(outside_test_set(spec, spec.outside_dir, spec.outside))
    return sets


def outside_test_set(spec: ExperimentSpec, folder: Path, name: str) -> TestSet:
    """Every labelled subject of an institution no arm trained on."""
    return _test_set(spec, name, True, load_datalist(folder))


def _test_set(spec: ExperimentSpec, name: str, outside: bool, items: list[dict]) -> TestSet:
    config = spec.run_config()  # evaluate on the grid the models were trained at, with their label values
    dataset = evaluation_dataset(
        items, config.spacing, label_mapping=config.labels.label_mapping, window=intensity_window(config)
    )
    return TestSet(name, outside, items, dataset)


def evaluate(
    arm: Arm,
    models: Sequence[ModelCheckpoint],
    tests: Sequence[TestSet],
    results: Path,
    overlay_cases: int,
    privacy: Privacy,
) -> list[CaseRow]:
    """Per-case Dice of the model (mean probability of an ensemble; a personal model weighted as its
    `ensemble_weight` says, fedseg.personal_mix) on every test set; overlay slices."""
    trainers = [model.trainer() for model in models]
    labels = smallest_threshold([model.labels for model in models])  # an ensemble's members may differ
    rows = []
    for test in tests:
        own = not arm.trained_on.startswith("site-") or arm.trained_on == test.name
        for index, batch in enumerate(DataLoader(test.dataset, batch_size=1, num_workers=0)):
            outputs = [labels.probabilities(t.predict_logits(batch["image"])) for t in trainers]
            probabilities = ensemble_mean(outputs, [model.ensemble_weight for model in models]).cpu()
            dice = labels.dice(probabilities, batch["label"])[0].tolist()
            subject = test.items[index]["subject"]
            rows.append(
                CaseRow(arm.name, arm.kind, arm.trained_on, test.name, test.outside, subject, tuple(dice), *privacy)
            )
            if own and index < overlay_cases:
                save_overlay(
                    results / OVERLAYS / overlay_case(test.name, subject) / f"{arm.id}.npz",
                    batch["image"][0, 0],
                    batch["label"][0, 0],
                    labels.label_map(probabilities)[0, 0],
                )
    return rows


def save_overlay(path: Path, image: torch.Tensor, truth: torch.Tensor, prediction: torch.Tensor) -> None:
    """One axial slice (the one with the most foreground in the truth) of image, truth and prediction."""
    z = int((truth > 0).sum(dim=(0, 1)).argmax())
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        image=image[..., z].numpy().astype(np.float16),
        truth=truth[..., z].numpy().astype(np.uint8),
        prediction=prediction[..., z].numpy().astype(np.uint8),
    )


def collect_cases(results: Path, arms: Sequence[Arm], structures: Sequence[str]) -> None:
    """cases.csv = the rows of every finished, evaluated arm, in plan order."""
    files = [results / ARMS / arm.id / CASES for arm in arms if arm.evaluated]
    rows = [row for path in files if path.is_file() for row in read_cases(path)]
    if rows:
        write_cases(results / CASES, rows, structures)
