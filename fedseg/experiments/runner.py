"""`fedseg experiment CONFIG.toml`: train every arm, test every model on every test set, write cases.csv.

Per arm (see fedseg.report.layout for the files): a Federation run through the LocalGrid, a model
checkpoint, then per-case Dice of the final model on every site's held-out test split and on the
outside institution, computed here by the one party running the experiment (its own or synthetic
data), with the model's final (ε, δ) where it was trained with DP, and a few overlay slices.
`arm.json` is written last: an arm that has it is skipped when the experiment is started again;
an interrupted federated arm resumes from its last finished round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord

from clients.personal import PersonalState
from fedseg.checkpoint import CHECKPOINT_FILE, check_resumable, load_checkpoint
from fedseg.config import ConfigError, RunConfig
from fedseg.data.datalist import SiteSplit
from fedseg.data.sites import with_input_channels
from fedseg.enhancing import describe
from fedseg.experiments.arms import POOLED, Arm, plan_arms, with_secure_aggregation
from fedseg.experiments.evaluation import ExperimentError, TestSet, arm_privacy, collect_cases, evaluate, test_sets
from fedseg.experiments.local_grid import LocalGrid, server_identity
from fedseg.experiments.spec import ExperimentSpec
from fedseg.experiments.views import SitePart, load_splits, site_parts, write_view
from fedseg.federation import FINAL_MODEL, Federation, run_key
from fedseg.json_records import read_json_object
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.progress import experiment_bars
from fedseg.report.cases import CaseRow, write_cases
from fedseg.report.layout import (
    ARM_INFO,
    ARMS,
    CASES,
    MODEL,
    PERSONAL,
    PERSONAL_MEAN,
    SITE_STATE,
    ArmInfo,
)
from fedseg.server_app import initial_weights
from fedseg.software import software_versions
from fedseg.tracking import Tracker, TrackerGroup, open_run_tracker
from strategies.registry import build_strategy

SPEC_FILE = "experiment.json"
TRACKING_KEYS = ("tracking", "tracking-dir")  # [run] keys that do not change an arm's results
# Lists whose appended values only add arms (the first strategy, which a DP sweep trains, stays first)
GROWABLE = ("arms", "strategies", "dp_sgd_noise_multipliers", "dp_noised_noise_multipliers")
VIEWS = "views"


def run_experiment(spec: ExperimentSpec, echo: Callable[[str], None] = print) -> Path:
    """Run (or continue) every arm of `spec`; return the results folder holding cases.csv."""
    results = spec.results_dir.resolve()
    arms = plan_arms(spec)
    _check_arms(spec, arms, results)
    _claim(results, spec, echo)
    seed = spec.run_config().seed
    splits = load_splits([spec.site_dir(k) for k in range(spec.sites)], seed)
    tests = test_sets(spec, splits)
    with experiment_bars(len(arms)) as (bars, arm_bar, round_bar):
        for index, arm in enumerate(arms, start=1):
            folder = results / ARMS / arm.id
            if (folder / ARM_INFO).is_file():
                echo(f"[{index}/{len(arms)}] {arm.id}: finished earlier, skipped")
                bars.advance(arm_bar)
                continue
            echo(
                f"[{index}/{len(arms)}] {arm.id}: "
                + (
                    f"ensemble of {len(arm.members)} models"
                    if arm.members
                    else f"{arm.strategy}, {arm.rounds} round(s) × {arm.epochs:g} epoch(s) on {len(arm.nodes)} node(s)"
                )
            )
            started = time.perf_counter()
            folder.mkdir(parents=True, exist_ok=True)
            models = [ModelCheckpoint.load(results / ARMS / m / MODEL) for m in arm.members] or [
                _train(spec, arm, splits, results, folder, round_bar.start(f"  {arm.id}: rounds", arm.rounds))
            ]
            if arm.evaluated:
                dp_kind, epsilon, delta = privacy = arm_privacy(folder)
                rows = evaluate(arm, models, tests, results, spec.overlay_cases, privacy)
                if arm.kind == "federated":
                    rows += _personal_rows(spec, arm, models[0], tests, results, folder)
                write_cases(folder / CASES, rows, spec.run_config().labels.structures)
                inside = [r.score for r in rows if not r.outside]
                echo(
                    f"    mean Dice {np.nanmean(inside):.3f} on the sites' test splits"
                    + (f"; {dp_kind} ε = {epsilon:.2f} at δ = {delta:g}" if dp_kind else "")
                )
            model_bytes = sum(t.numel() * t.element_size() for t in models[0].state_dict.values())
            seconds = time.perf_counter() - started
            ArmInfo(arm.name, arm.kind, arm.trained_on, model_bytes, len(arm.nodes), seconds, software_versions()).save(
                folder
            )
            collect_cases(results, arms, spec.run_config().labels.structures)
            echo(f"    done in {seconds:.0f} s")
            bars.advance(arm_bar)
    return results


def _claim(results: Path, spec: ExperimentSpec, echo: Callable[[str], None]) -> None:
    """Record the config in a new results folder; refuse a folder made by a different config. Values
    appended to a GROWABLE list (a sweep, the strategies) only add arms: the experiment continues."""
    path = results / SPEC_FILE
    wanted = spec.to_dict()
    if path.is_file():
        saved = saved_spec(results)
        changed = changed_keys(saved, wanted)
        if changed:
            raise ExperimentError(
                f"{results}: made by a different experiment config (changed: {spec_keys(changed)}); "
                "delete the folder or give the experiment another name"
                + (f" (values may only be appended to {spec_keys(GROWABLE)})" if set(changed) & set(GROWABLE) else "")
            )
        grown = [k for k in GROWABLE if saved.get(k) != wanted.get(k)]
        if not grown:
            return
        echo(f"{results}: values appended to {spec_keys(grown)}; finished arms are kept, the new ones run")
    results.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(wanted, indent=2))


def saved_spec(results: Path) -> dict[str, Any]:
    """The experiment.json of a results folder; ExperimentError naming it when it is not a JSON object."""
    try:
        return read_json_object(results / SPEC_FILE)
    except ValueError as err:
        raise ExperimentError(str(err)) from None


def changed_keys(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The spec fields whose change from `saved` (a results folder's experiment.json) to `wanted` would
    change the arms already run there."""
    return sorted(k for k in set(saved) | set(wanted) if not _keeps_results(k, saved.get(k), wanted.get(k)))


def spec_keys(names: Sequence[str]) -> str:
    """Spec field names as the config file spells them (dp_sgd_noise_multipliers → dp-sgd-noise-multipliers)."""
    return ", ".join(name.replace("_", "-") for name in names)


def _keeps_results(key: str, saved: Any, wanted: Any) -> bool:
    """Whether changing `key` from `saved` to `wanted` leaves the arms already run as they are: only the
    [run] keys that say where a run is watched (tracking) changed, or values were appended to a sweep."""
    if key == "run":
        return isinstance(saved, dict) and _untracked(saved) == _untracked(wanted)
    if key in GROWABLE and isinstance(saved, list) and isinstance(wanted, list):
        return wanted[: len(saved)] == saved
    return saved == wanted


def _untracked(run: dict | None) -> dict:
    """[run] without the keys that only say where a run is watched."""
    return {key: value for key, value in (run or {}).items() if key not in TRACKING_KEYS}


def _train(
    spec: ExperimentSpec, arm: Arm, splits: Sequence[SiteSplit], results: Path, folder: Path, progress: Tracker
) -> ModelCheckpoint:
    """One Federation run of the arm through the LocalGrid (resumed if interrupted); the final model.
    `progress` sees the rounds as a tracker does (fedseg.progress.RoundBar)."""
    values = _arm_values(spec, arm, results, folder)
    config = with_input_channels(RunConfig.from_mapping(values))
    nodes = []
    for node in arm.nodes:  # each site's state (privacy ledger, preprocessed cache) stays in this experiment
        data_dir = _node_dir(spec, arm, node, splits, results)
        nodes.append(
            {"data-dir": str(data_dir), "site-id": max(node, 0), "state-dir": str(results / SITE_STATE / data_dir.name)}
        )
    resume = None
    if (folder / CHECKPOINT_FILE).is_file():
        resume = load_checkpoint(folder)
        check_resumable(resume, config, folder)
    if arm.start_from:
        initial = ArrayRecord(dict(ModelCheckpoint.load(results / ARMS / arm.start_from / MODEL).state_dict))
    else:
        initial = initial_weights(config)
    with server_identity():
        tracker = TrackerGroup([open_run_tracker(config, folder, experiment=spec.name), progress])
        federation = Federation(LocalGrid(values, nodes), build_strategy(config), config, folder, tracker)
        federation.run(initial, resume)
    # the run's own model file: the same weights, with what the sites chose for it (fedseg.enhancing)
    model = ModelCheckpoint.load(folder / FINAL_MODEL)
    description = f"fedseg experiment {spec.name}, arm {arm.name}, trained on {arm.trained_on}"
    if model.enhancing_min_voxels:
        description += f"; {describe(model.enhancing_min_voxels)}"
    model = dataclasses.replace(model, description=description)
    model.save(folder / MODEL)
    return model


def _arm_values(spec: ExperimentSpec, arm: Arm, results: Path, folder: Path) -> dict[str, Any]:
    """The run config of one arm: the experiment's [run] with the arm's strategy, rounds and sites."""
    values = spec.run_values(
        **{
            "strategy": arm.strategy,
            "num-server-rounds": arm.rounds,
            "local-epochs": arm.epochs,
            "min-sites": len(arm.nodes),
            "output-dir": str(folder),
            **arm.params,
        }
    )
    values["secure-aggregation"] = with_secure_aggregation(arm, bool(values.get("secure-aggregation", False)))
    values["tracking-dir"] = values.get("tracking-dir") or str(results)  # one TensorBoard / MLflow view per experiment
    return values


def _check_arms(spec: ExperimentSpec, arms: Sequence[Arm], results: Path) -> None:
    """Every trained arm's run config, before the first arm trains (an arm with other rounds, e.g. a
    fine-tuning or cyclic arm, can make a [run] value invalid for it alone)."""
    for arm in arms:
        if arm.members:
            continue
        try:
            RunConfig.from_mapping(_arm_values(spec, arm, results, results / ARMS / arm.id))
        except ConfigError as err:
            raise ConfigError(f"arm {arm.id}: {err}") from None


def _node_dir(spec: ExperimentSpec, arm: Arm, node: int, splits: Sequence[SiteSplit], results: Path) -> Path:
    """A real site folder, or a view (all sites pooled, or one fold of a site)."""
    if node != POOLED and arm.fold is None:
        return spec.site_dir(node)
    seed, folds = spec.run_config().seed, spec.ensemble_folds
    sites = range(spec.sites) if node == POOLED else [node]
    parts: list[SitePart] = [site_parts(k, splits[k], arm.fold, folds, seed) for k in sites]
    name = ("pooled" if node == POOLED else f"site-{node}") + ("" if arm.fold is None else f"-fold{arm.fold}")
    return write_view(results / VIEWS / name, parts, seed)


def _personal_rows(
    spec: ExperimentSpec, arm: Arm, model: ModelCheckpoint, tests: Sequence[TestSet], results: Path, folder: Path
) -> list[CaseRow]:
    """Each site's personal model (FedBN, FedPer, Ditto; kept in its state dir) on its own test split, as
    arm `<name>-personal` trained on that site; where the personal model is a whole model of its own
    (Ditto), also the mean of its and the global model's probabilities, as arm `<name>-ensemble` (the
    personal model weighted as the global model's `personal_weight` says, fedseg.personal_mix).
    Nothing for strategies without personal models."""
    rows = []
    no_privacy = ("", math.nan, math.nan)
    for node in arm.nodes:
        state = PersonalState(results / SITE_STATE / spec.site_dir(node).name, run_key(folder))
        weights = state.personal_model(model.state_dict)
        if weights is None:
            continue
        personal = dataclasses.replace(model, state_dict=weights, description=f"{arm.name} personal, site-{node}")
        site = Arm(f"{arm.name}{PERSONAL}", "personal", f"site-{node}", (node,))
        rows += evaluate(site, [personal], [tests[node]], results, 0, no_privacy)
        if state.has_own_model():
            both = Arm(f"{arm.name}{PERSONAL_MEAN}", "personal", f"site-{node}", (node,))
            weighted = dataclasses.replace(personal, ensemble_weight=model.personal_weight)
            rows += evaluate(both, [model, weighted], [tests[node]], results, 0, no_privacy)
    return rows
