"""Runs land where the user expects: `fedseg run` resolves relative run-config paths against the caller's
folder (end to end, with a run: tests/test_simulation.py), and a local SuperLink of another Python
environment is found, refused and stopped. Every SuperLink here is private (own FLWR_HOME and ports)."""

from __future__ import annotations

import site
import venv
from pathlib import Path

import pytest
from conftest import REPO
from private_superlink import start_local_superlink

from fedseg.local_superlink import (
    SuperLinkError,
    absolute_run_config,
    check_local_superlink,
    find_local_superlink,
    this_bin_dir,
)


def other_environment(root: Path) -> Path:
    """A second Python environment (its own prefix and bin folder) that sees this one's packages; its
    flower-superlink (and the flower-superexec it starts) run with its own interpreter. Returns its bin folder."""
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    bin_dir = root / "bin"
    (site_packages,) = (root / "lib").glob("python*/site-packages")
    (site_packages / "shared.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    for name in ("flower-superlink", "flower-superexec"):  # the SuperLink starts the second by name
        script = (this_bin_dir() / name).read_text().split("\n", 1)[1]
        (bin_dir / name).write_text(f"#!{bin_dir / 'python'}\n{script}")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_relative_paths_resolve_against_the_callers_folder(tmp_path: Path) -> None:
    resolved = absolute_run_config(REPO, ['data-dir="sites" num-server-rounds=2', 'tracking-dir="tb"'], tmp_path)
    assert resolved == {
        "output-dir": str(tmp_path / "runs"),
        "data-dir": str(tmp_path / "sites"),
        "tracking-dir": str(tmp_path / "tb"),
    }
    # absolute paths and the non-path values ("synthetic", "") stay as they are
    assert absolute_run_config(REPO, [f'output-dir="{tmp_path}/x"'], Path("/elsewhere")) == {
        "output-dir": str(tmp_path / "x")
    }


def test_a_superlink_of_another_environment_is_refused_then_stopped(
    tmp_path: Path, private_flwr: dict[str, str]
) -> None:
    first = tmp_path / "first-checkout"
    first.mkdir()
    other_bin = other_environment(tmp_path / "other-venv")
    proc = start_local_superlink(other_bin, first, private_flwr)
    found = find_local_superlink()
    assert found is not None and found.pid == proc.pid
    assert found.bin_dir == other_bin.resolve() and found.folder == first and not found.same_environment
    with pytest.raises(
        SuperLinkError,
        match=rf"local SuperLink pid {proc.pid}: another Python environment "
        rf"\({other_bin.resolve()}\), started from folder {first}: .*"
        r"fedseg superlink stop\) or pass --restart-superlink",
    ):
        check_local_superlink(restart=False)
    assert proc.poll() is None
    check_local_superlink(restart=True, echo=lambda line: None)
    assert proc.wait(timeout=30) is not None and find_local_superlink() is None
