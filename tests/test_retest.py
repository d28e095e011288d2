"""fedseg retest: an experiment's finished models on another outside institution, nothing trained again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from fedseg.cli import app
from fedseg.data.synth import synthesize
from fedseg.experiments import ExperimentSpec, run_experiment
from fedseg.report.cases import read_cases
from fedseg.software import software_versions

RUN = {"num-server-rounds": 1, "local-epochs": 1, "patch-size": "16,16,16", "batch-size": 2, "seed": 1}


def write_config(path: Path, data: Path, results: Path, **experiment: object) -> Path:
    values = {"name": "tiny", "data-dir": str(data), "sites": 2, "output-dir": str(results), **experiment}
    lines = ["[experiment]", *(f"{key} = {json.dumps(value)}" for key, value in values.items()), "[run]"]
    path.write_text("\n".join([*lines, *(f"{key} = {json.dumps(value)}" for key, value in RUN.items())]) + "\n")
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished tiny experiment (private and FedAvg arms) and its config."""
    root = tmp_path_factory.mktemp("retest")
    synthesize(root / "data", "tiny", seed=0, num_sites=2)
    config = write_config(root / "tiny.toml", root / "data", root / "results", arms=["private", "federated"])
    run_experiment(ExperimentSpec.from_toml(config), echo=lambda _: None)
    return root, config


def test_retest_keeps_the_internal_cases_and_tests_every_outside_scan(finished: tuple[Path, Path]) -> None:
    root, config = finished
    synthesize(root / "more", "tiny", seed=0, num_sites=2, outside_subjects=6)  # the same 4 outside scans, then 2
    result = CliRunner().invoke(app, ["retest", str(config), str(root / "more" / "outside"), "--out", str(root / "x")])
    assert result.exit_code == 0, result.output
    assert "[3/3] fedavg--federation: 6 scans of outside" in result.output
    before, after = read_cases(root / "results" / "tiny" / "cases.csv"), read_cases(root / "x" / "cases.csv")
    assert [r for r in after if not r.outside] == [r for r in before if not r.outside]
    old = {(r.arm, r.trained_on, r.subject): r.dice for r in before if r.outside}
    new = {(r.arm, r.trained_on, r.subject): r.dice for r in after if r.outside}
    assert len(old) == 3 * 4 and len(new) == 3 * 6
    assert {key: new[key] for key in old} == old  # the same models on the same scans: the experiment's Dice
    for arm in ("private--site-0", "fedavg--federation"):  # what the report reads besides cases.csv
        for name in ("arm.json", "history.json"):
            assert (root / "x" / "arms" / arm / name).read_bytes() == (
                root / "results" / "tiny" / "arms" / arm / name
            ).read_bytes()
    record = json.loads((root / "x" / "retest.json").read_text())
    assert record["outside"] == str(root / "more" / "outside") and record["software"] == software_versions()
    assert not list(root.glob(".x.partial"))


def test_retest_refuses_what_it_cannot_test_in_one_line(finished: tuple[Path, Path], tmp_path: Path) -> None:
    root, config = finished

    def error(*args: str) -> str:
        result = CliRunner().invoke(app, ["retest", *args])
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("error: ")
        return result.output

    outside = str(root / "data" / "outside")
    assert "a site the experiment trained on" in error(str(config), str(root / "data" / "site-1"), "--out", "y")
    assert "give a new folder" in error(str(config), outside, "--out", str(root / "results" / "tiny" / "again"))
    (tmp_path / "taken").mkdir()
    assert "give a new folder" in error(str(config), outside, "--out", str(tmp_path / "taken"))
    changed = write_config(tmp_path / "c.toml", root / "data", root / "results", arms=["private"])
    assert "made by a different experiment config (changed: arms)" in error(str(changed), outside, "--out", "y")
    other = write_config(tmp_path / "o.toml", root / "data", tmp_path / "none")
    assert "no results of experiment 'tiny'" in error(str(other), outside, "--out", str(tmp_path / "y"))
    shutil.copytree(root / "results", tmp_path / "partial")
    shutil.rmtree(tmp_path / "partial" / "tiny" / "arms" / "fedavg--federation")
    unfinished = write_config(tmp_path / "u.toml", root / "data", tmp_path / "partial", arms=["private", "federated"])
    assert "arm fedavg--federation not finished" in error(str(unfinished), outside, "--out", str(tmp_path / "y"))
    (tmp_path / "partial" / "tiny" / "experiment.json").write_text("[" * 100_000)
    assert "experiment.json: not a readable JSON record (RecursionError)" in error(
        str(unfinished), outside, "--out", str(tmp_path / "y")
    )
    (tmp_path / "empty").mkdir()
    assert "not a site folder" in error(str(config), str(tmp_path / "empty"), "--out", str(tmp_path / "y"))
    shutil.copytree(root / "data" / "outside", tmp_path / "broken")
    scan = sorted((tmp_path / "broken" / "imagesTr").iterdir())[1]
    scan.write_bytes(scan.read_bytes()[:200])  # a truncated upload
    assert f"error: {scan}: cannot read" in error(str(config), str(tmp_path / "broken"), "--out", str(tmp_path / "y"))
    history = tmp_path / "partial" / "tiny" / "arms" / "private--site-0" / "history.json"
    (tmp_path / "partial" / "tiny" / "experiment.json").write_text(
        (root / "results" / "tiny" / "experiment.json").read_text()
    )
    shutil.copytree(
        root / "results" / "tiny" / "arms" / "fedavg--federation", history.parents[1] / "fedavg--federation"
    )
    for junk in ('{"rounds": [', "[1, 2]", '{"rounds": "x"}'):
        history.write_text(junk)
        assert f"{history}: not a run history" in error(str(unfinished), outside, "--out", str(tmp_path / "y"))
    history.unlink()
    (history.parent / "arm.json").rename(history.parent / "real.json")
    (history.parent / "arm.json").symlink_to(history.parent / "real.json")
    assert "arm.json: a link" in error(str(unfinished), outside, "--out", str(tmp_path / "y"))
    spec = json.loads((tmp_path / "partial" / "tiny" / "experiment.json").read_text())
    (tmp_path / "partial" / "tiny" / "experiment.json").write_text(json.dumps({**spec, "run": [1]}))
    assert "made by a different experiment config (changed: run)" in error(
        str(unfinished), outside, "--out", str(tmp_path / "y")
    )
    assert not (tmp_path / "y").exists() and not Path("y").exists()


def test_retest_refuses_the_sites_scans_and_other_channels(finished: tuple[Path, Path], tmp_path: Path) -> None:
    root, config = finished
    linked = tmp_path / "linked"  # a folder of links to a site's files, as an experiment's views are
    shutil.copytree(root / "data" / "site-0", linked, copy_function=lambda src, dst: Path(dst).symlink_to(src))
    (linked / "allow-outside-data").touch()
    result = CliRunner().invoke(app, ["retest", str(config), str(linked), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "a scan of a site the experiment trained on (12 such files)" in result.output
    copied = tmp_path / "copied"  # hard-linked copies: other paths, the same files
    shutil.copytree(root / "data" / "site-0", copied, copy_function=os.link)
    (copied / "allow-outside-data").touch()
    result = CliRunner().invoke(app, ["retest", str(config), str(copied), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "a scan of a site the experiment trained on (12 such files)" in result.output
    assert f"{copied}/" in result.output
    duplicated = tmp_path / "duplicated"  # plain copies: other files, the same bytes
    shutil.copytree(root / "data" / "site-0", duplicated)
    (duplicated / "allow-outside-data").touch()
    result = CliRunner().invoke(app, ["retest", str(config), str(duplicated), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "a scan of a site the experiment trained on (12 such files)" in result.output
    two = tmp_path / "two"  # the models take one channel
    shutil.copytree(root / "data" / "outside", two)
    for scan in (two / "imagesTr").iterdir():
        image = nib.load(scan)
        data = np.asanyarray(image.dataobj)
        nib.save(nib.Nifti1Image(np.stack([data, data], -1), image.affine), scan)
    result = CliRunner().invoke(app, ["retest", str(config), str(two), "--out", str(tmp_path / "y")])
    assert result.exit_code == 2 and "channel" in result.output and "scans of" not in result.output, result.output
    assert not (tmp_path / "y").exists()


def test_retest_names_the_outside_as_the_experiment_did_and_leaves_other_folders(
    finished: tuple[Path, Path], tmp_path: Path
) -> None:
    root, config = finished
    shutil.copytree(root / "data" / "outside", tmp_path / "site-0")  # a folder whose name is a site's
    (tmp_path / "victim").mkdir()
    (tmp_path / ".y.partial").symlink_to(tmp_path / "victim")  # a temporary name another run could hold
    result = CliRunner().invoke(app, ["retest", str(config), str(tmp_path / "site-0"), "--out", str(tmp_path / "y")])
    assert result.exit_code == 0, result.output
    assert {r.tested_on for r in read_cases(tmp_path / "y" / "cases.csv") if r.outside} == {"outside"}
    assert list((tmp_path / "victim").iterdir()) == [] and (tmp_path / ".y.partial").is_symlink()
