"""A site's personal model (FedBN's normalisation layers, FedPer's output stage, Ditto's own model) as a
fedseg model file: what `fedseg personal-model` writes, so that the site can segment with it, or with
its mean with the global model (`fedseg predict --model model.pt --model personal.pt`; a whole personal
model, Ditto's, carries the weight the federation chose for it: fedseg.personal_mix).

The personal model lives only in the site's state dir (`<state-dir>/personal/<run key>/`); it is put
together with the federation's global model file, whose network, label scheme and post-processing it
shares. Nothing leaves the site.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from clients.personal import PersonalState, PersonalStateError
from fedseg.federation import run_key
from fedseg.model_checkpoint import CheckpointError, ModelCheckpoint


def runs_with_personal_models(state_dir: Path) -> list[str]:
    """The run keys under `state_dir` for which the site keeps a personal model, sorted."""
    folder = state_dir / "personal"
    if not folder.is_dir():
        return []
    return sorted(run.name for run in folder.iterdir() if PersonalState(state_dir, run.name).keeps_personal_model())


def export_personal_model(
    global_model: str | Path, state_dir: str | Path, out: str | Path, run: str | None = None
) -> tuple[ModelCheckpoint, str]:
    """Write the site's personal model of run `run` as a fedseg model file at `out`; return it and the
    run key. Without `run`: the run of `global_model` when that is a run folder, else the state dir's
    only run with a personal model. CheckpointError (one line naming the file and the fault) when
    there is none, more than one to choose from, or the kept layers do not fit the global model."""
    if run is not None and (Path(run).name != run or run in {".", ".."}):
        raise CheckpointError(f"--run {run!r}: a run key is a folder name under <state-dir>/personal, not a path")
    model = ModelCheckpoint.load(global_model)
    state_dir = Path(state_dir)
    key = run or _run_of(Path(global_model), state_dir)
    state = PersonalState(state_dir, key)
    try:
        weights = state.personal_model(model.state_dict)
    except PersonalStateError as err:
        raise CheckpointError(str(err)) from None
    if weights is None:
        raise CheckpointError(f"{state.folder}: no personal model (FedBN, FedPer or Ditto) kept for run '{key}'")
    personal = dataclasses.replace(
        model,
        state_dict=weights,
        description=f"{model.description}; personal model of one site (run {key})",
        personal_weight=None,
        ensemble_weight=model.personal_weight if state.has_own_model() else None,
    )
    fault = personal.weights_fault()
    if fault:
        raise CheckpointError(f"{state.folder}: the personal model does not fit {global_model}: {fault}")
    if not all(bool(torch.isfinite(v).all()) for v in weights.values() if v.is_floating_point()):
        raise CheckpointError(f"{state.folder}: the personal model holds non-finite values")
    personal.save(out)
    return personal, key


def _run_of(global_model: Path, state_dir: Path) -> str:
    """The run key when the caller did not name one (see export_personal_model)."""
    if (global_model / "history.json").is_file():
        return run_key(global_model)
    runs = runs_with_personal_models(state_dir)
    if len(runs) == 1:
        return runs[0]
    if not runs:
        raise CheckpointError(f"{state_dir}: no personal model (FedBN, FedPer or Ditto) kept in this state dir")
    raise CheckpointError(f"{state_dir}: personal models of {len(runs)} runs; choose one with --run: {', '.join(runs)}")
