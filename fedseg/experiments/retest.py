"""`fedseg retest CONFIG OUTSIDE --out DIR`: an experiment's finished models tested on another institution
none of them trained on, without training anything again: external validation after training (a larger
outside test set, one labelled later, or the same scans labelled by another annotator).

DIR gets what `fedseg report` reads: per arm its arm.json and history.json (copied) and a cases.csv with
the arm's internal test cases as the experiment wrote them and every labelled subject of OUTSIDE in place
of the experiment's outside institution (under the same test-set name, so `fedseg report --against` pairs
the two scan by scan); then the merged cases.csv and retest.json (what was retested, under which
software). Every input is checked before the first model runs: the results files, each model (and that
its input channels are OUTSIDE's), the scans, and that no scan is one of the sites' files. The
experiment's results folder is only read; DIR is written into a fresh temporary folder beside it and
renamed when complete, so a failed or interrupted retest leaves no DIR.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fedseg.data.datalist import load_datalist
from fedseg.data.validate import validate_site
from fedseg.experiments.arms import Arm, plan_arms
from fedseg.experiments.evaluation import (
    ExperimentError,
    Privacy,
    TestSet,
    arm_privacy,
    collect_cases,
    evaluate,
    outside_test_set,
)
from fedseg.experiments.runner import SPEC_FILE, changed_keys, saved_spec, spec_keys
from fedseg.experiments.spec import ExperimentSpec
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.report.cases import CaseRow, read_cases, write_cases
from fedseg.report.layout import ARM_INFO, ARMS, CASES, HISTORY, MODEL, ArmInfo
from fedseg.software import software_versions

RETEST_FILE = "retest.json"
WHERE = ("data_dir", "output_dir")  # where the sites and results were: a results folder may have moved since
OUTSIDE_NAME = "outside"  # the test-set name when the experiment had no outside institution


@dataclass(frozen=True)
class _Finished:
    """What one finished arm contributes, read and checked before any model runs."""

    arm: Arm
    models: tuple[Path, ...]  # the model files (an ensemble's members)
    channels: frozenset[int]  # the input channels they take
    kept: list[CaseRow]  # the arm's rows as the experiment wrote them
    privacy: Privacy


def retest_experiment(
    spec: ExperimentSpec, outside: str | Path, out: str | Path, echo: Callable[[str], None] = print
) -> Path:
    """Test every finished arm of `spec` on the institution in `outside`; write the results folder `out`."""
    results = spec.results_dir.resolve()
    outside_dir, target = Path(outside).expanduser().resolve(), Path(out).expanduser().resolve()
    _check_results(spec, results)
    if target.exists() or target.is_symlink() or target == results or results in target.parents:
        raise ExperimentError(f"{target}: give a new folder outside the experiment's results (it is never rewritten)")
    finished = [_finished(results, arm) for arm in plan_arms(spec)]
    channels = _model_channels(finished)
    _check_data(spec, outside_dir, channels)
    test = outside_test_set(spec, outside_dir, spec.outside or OUTSIDE_NAME)
    _check_never_trained_on(spec, test.items, outside_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        _write(spec, finished, results, test, partial, echo)
        record = {
            "experiment": spec.name,
            "results": str(results),
            "outside": str(outside_dir),
            "software": software_versions(),  # the retest's own: arm.json keeps the software each arm trained with
        }
        (partial / RETEST_FILE).write_text(json.dumps(record, indent=2))
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _finished(results: Path, arm: Arm) -> _Finished:
    """The arm's files, each checked: arm.json, its cases, its run history and its model(s)."""
    source = results / ARMS / arm.id
    if not (source / ARM_INFO).is_file():
        raise ExperimentError(f"{results}: arm {arm.id} not finished; run the experiment first")
    for name in (ARM_INFO, HISTORY, CASES):
        if (source / name).is_symlink():
            raise ExperimentError(f"{source / name}: a link; an experiment writes plain files")
    ArmInfo.load(source)
    if not arm.evaluated:
        return _Finished(arm, (), frozenset(), [], ("", 0.0, 0.0))
    models = tuple(results / ARMS / member / MODEL for member in arm.members or (arm.id,))
    # loaded now, so a broken model is named before hours of testing the others (and again when tested)
    channels = frozenset(ModelCheckpoint.load(path).in_channels for path in models)
    return _Finished(arm, models, channels, read_cases(source / CASES), arm_privacy(source))


def _model_channels(finished: Iterable[_Finished]) -> int:
    """The input channels every model takes (the scans must have as many)."""
    channels = set().union(*(item.channels for item in finished))
    if len(channels) > 1:
        raise ExperimentError(f"the experiment's models take different input channels ({sorted(channels)})")
    return channels.pop() if channels else 1


def _write(
    spec: ExperimentSpec,
    finished: list[_Finished],
    results: Path,
    test: TestSet,
    partial: Path,
    echo: Callable[[str], None],
) -> None:
    """Each arm's files and cases into `partial`, then the merged cases.csv."""
    structures = spec.run_config().labels.structures
    for index, item in enumerate(finished, start=1):
        arm = item.arm
        folder = partial / ARMS / arm.id
        folder.mkdir(parents=True)
        for name in (ARM_INFO, HISTORY):
            if (results / ARMS / arm.id / name).is_file():
                shutil.copyfile(results / ARMS / arm.id / name, folder / name)
        if not arm.evaluated:
            continue
        echo(f"[{index}/{len(finished)}] {arm.id}: {len(test.items)} scans of {test.name}")
        models = [ModelCheckpoint.load(path) for path in item.models]
        rows = [row for row in item.kept if row.arm == arm.name and not row.outside]
        rows += evaluate(arm, models, [test], partial, 0, item.privacy)
        rows += [row for row in item.kept if row.arm != arm.name]  # personal models (FedBN, Ditto): own sites
        write_cases(folder / CASES, rows, structures)
    collect_cases(partial, [item.arm for item in finished], structures)


def _check_results(spec: ExperimentSpec, results: Path) -> None:
    """The results folder exists and was made by this config (else its models are another experiment's),
    wherever its sites and results lay then."""
    if not (results / SPEC_FILE).is_file():
        raise ExperimentError(f"{results}: no results of experiment '{spec.name}' ({SPEC_FILE} missing)")
    changed = [key for key in changed_keys(saved_spec(results), spec.to_dict()) if key not in WHERE]
    if changed:
        raise ExperimentError(f"{results}: made by a different experiment config (changed: {spec_keys(changed)})")


def _check_data(spec: ExperimentSpec, outside: Path, channels: int) -> None:
    """Every scan of the outside institution readable, finite, with the models' channels and labelled with
    the run's values: a broken file is named before any model is tested."""
    labels = spec.run_config().labels
    report = validate_site(outside, channels=channels, label_values=labels.allowed_label_values, min_subjects=1)
    if report.errors:
        raise ExperimentError(
            f"{report.errors[0]} ({len(report.errors)} data error(s) in {outside}; `fedseg validate-data` lists them)"
        )


def _check_never_trained_on(spec: ExperimentSpec, items: list[dict], outside: Path) -> None:
    """No outside scan is a file of a site the experiment trained on: a site folder, a link to one, a view,
    a hard-linked or byte-identical copy."""
    sites = [spec.site_dir(k) for k in range(spec.sites)]
    if outside in sites:
        raise ExperimentError(f"{outside}: a site the experiment trained on, not an outside institution")
    trained = _files([item for site in sites if site.is_dir() for item in load_datalist(site, allow_outside=True)])
    same_file = {(stat.st_dev, stat.st_ino) for stat in trained.values()}
    by_size: dict[int, list[Path]] = defaultdict(list)
    for site_file, stat in trained.items():
        by_size[stat.st_size].append(site_file)
    digest = functools.cache(_sha256)  # each file read at most once, and only where sizes match
    shared = sorted(
        path
        for path, stat in _files(items).items()
        if (stat.st_dev, stat.st_ino) in same_file
        or any(digest(site_file) == digest(path) for site_file in by_size.get(stat.st_size, ()))
    )
    if shared:
        raise ExperimentError(f"{shared[0]}: a scan of a site the experiment trained on ({len(shared)} such files)")


def _sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _files(items: list[dict]) -> dict[Path, os.stat_result]:
    """The image and label files of datalist items (an image may be a list of modalities), each with its
    status (through links); missing files are left out."""
    files: dict[Path, os.stat_result] = {}
    for item in items:
        for key in ("image", "label"):
            value = item[key]
            for path in map(Path, value if isinstance(value, list) else [value]):
                try:
                    files[path] = path.stat()
                except OSError:
                    continue
    return files
