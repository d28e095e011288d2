"""`fedseg retest CONFIG OUTSIDE --out DIR`: an experiment's finished models tested on another institution
none of them trained on, without training anything again: external validation after training (a larger
outside test set, one labelled later, or the same scans labelled by another annotator).

DIR gets what `fedseg report` reads: per arm its arm.json and history.json (copied) and a cases.csv with
the arm's internal test cases as the experiment wrote them and every labelled subject of OUTSIDE in place
of the experiment's outside institution; then the merged cases.csv and retest.json (what was retested,
under which software). The experiment's results folder is only read; DIR is written under a temporary
name and renamed when complete, so an interrupted retest leaves no DIR.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from fedseg.data.validate import validate_site
from fedseg.errors import first_line
from fedseg.experiments.arms import Arm, plan_arms
from fedseg.experiments.evaluation import (
    ExperimentError,
    TestSet,
    arm_privacy,
    collect_cases,
    evaluate,
    outside_test_set,
)
from fedseg.experiments.runner import SPEC_FILE, changed_keys, spec_keys
from fedseg.experiments.spec import ExperimentSpec
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.report.cases import read_cases, write_cases
from fedseg.report.layout import ARM_INFO, ARMS, CASES, HISTORY, MODEL
from fedseg.software import software_versions

RETEST_FILE = "retest.json"
WHERE = ("data_dir", "output_dir")  # where the sites and results were: a results folder may have moved since


def retest_experiment(
    spec: ExperimentSpec, outside: str | Path, out: str | Path, echo: Callable[[str], None] = print
) -> Path:
    """Test every finished arm of `spec` on the institution in `outside`; write the results folder `out`."""
    results = spec.results_dir.resolve()
    outside_dir, target = Path(outside).expanduser().resolve(), Path(out).expanduser().resolve()
    _check_results(spec, results)
    if outside_dir in {spec.site_dir(k) for k in range(spec.sites)}:
        raise ExperimentError(f"{outside_dir}: a site the experiment trained on, not an outside institution")
    if target.exists() or target == results or results in target.parents:
        raise ExperimentError(f"{target}: give a new folder outside the experiment's results (it is never rewritten)")
    arms = plan_arms(spec)
    unfinished = [arm.id for arm in arms if not (results / ARMS / arm.id / ARM_INFO).is_file()]
    if unfinished:
        raise ExperimentError(f"{results}: arm(s) {', '.join(unfinished)} not finished; run the experiment first")
    _check_data(spec, outside_dir)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        _retest(spec, arms, results, outside_test_set(spec, outside_dir, outside_dir.name), partial, echo)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    record = {
        "experiment": spec.name,
        "results": str(results),
        "outside": str(outside_dir),
        "software": software_versions(),  # the retest's own: arm.json keeps the software each arm trained with
    }
    (partial / RETEST_FILE).write_text(json.dumps(record, indent=2))
    partial.rename(target)
    return target


def _retest(
    spec: ExperimentSpec, arms: list[Arm], results: Path, test: TestSet, partial: Path, echo: Callable[[str], None]
) -> None:
    """Write each arm's files and cases into `partial`, then the merged cases.csv."""
    structures = spec.run_config().labels.structures
    for index, arm in enumerate(arms, start=1):
        source, folder = results / ARMS / arm.id, partial / ARMS / arm.id
        folder.mkdir(parents=True)
        for name in (ARM_INFO, HISTORY):
            if (source / name).is_file():
                shutil.copy2(source / name, folder / name)
        if not arm.evaluated:
            continue
        echo(f"[{index}/{len(arms)}] {arm.id}: {len(test.items)} scans of {test.name}")
        models = [ModelCheckpoint.load(results / ARMS / member / MODEL) for member in arm.members or (arm.id,)]
        kept = read_cases(source / CASES)
        rows = [row for row in kept if row.arm == arm.name and not row.outside]
        rows += evaluate(arm, models, [test], partial, 0, arm_privacy(source))
        rows += [row for row in kept if row.arm != arm.name]  # personal models (FedBN, Ditto): their own sites
        write_cases(folder / CASES, rows, structures)
    collect_cases(partial, arms, structures)


def _check_data(spec: ExperimentSpec, outside: Path) -> None:
    """Every scan of the outside institution readable, finite and labelled with the run's values: a broken
    file is named before any model is tested."""
    config = spec.run_config()
    report = validate_site(
        outside, channels=config.in_channels or None, label_values=config.labels.allowed_label_values, min_subjects=1
    )
    if report.errors:
        raise ExperimentError(
            f"{report.errors[0]} ({len(report.errors)} data error(s) in {outside}; `fedseg validate-data` lists them)"
        )


def _check_results(spec: ExperimentSpec, results: Path) -> None:
    """The results folder exists and was made by this config (else its models are another experiment's),
    wherever its sites and results lay then."""
    path = results / SPEC_FILE
    if not path.is_file():
        raise ExperimentError(f"{results}: no results of experiment '{spec.name}' ({SPEC_FILE} missing)")
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ExperimentError(f"{path}: unreadable ({first_line(err)})") from None
    if not isinstance(saved, dict):
        raise ExperimentError(f"{path}: not a JSON object")
    changed = [key for key in changed_keys(saved, spec.to_dict()) if key not in WHERE]
    if changed:
        raise ExperimentError(f"{results}: made by a different experiment config (changed: {spec_keys(changed)})")
