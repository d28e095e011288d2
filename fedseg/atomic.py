"""Atomic file writes: readers (and a crash) never see half a file."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a unique temporary path beside `path`; rename it over `path` when the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


_STAGING_SUFFIX = ".partial"


@contextmanager
def site_staging_folder(site_dir: Path) -> Iterator[Path]:
    """Yield a fresh hidden folder beside `site_dir` to write a site into (then `publish_site_folder`).

    The folder is removed when the block fails, an interrupt included; only a killed process leaves
    one behind, which `remove_unfinished_sites` clears."""
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=site_dir.parent, prefix=f".{site_dir.name}-", suffix=_STAGING_SUFFIX))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_unfinished_sites(root: Path, names: Iterable[str]) -> int:
    """Remove the staging folders a killed writer left under `root` for the sites `names`; return how many.

    Only for a writer that owns `root` (`fedseg synth OUT`): another process writing the same site
    into `root` at the same time would lose its unfinished folder."""
    stale = [path for name in names for path in root.glob(f".{name}-*{_STAGING_SUFFIX}") if path.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def publish_site_folder(tmp: Path, site_dir: Path, manifest: dict) -> Path:
    """Write `manifest` as `tmp/dataset.json`, then rename the fully written folder `tmp` to
    `site_dir`; if another process published the same folder first, keep theirs (identical)."""
    (tmp / "dataset.json").write_text(json.dumps(manifest, indent=2))
    try:
        os.replace(tmp, site_dir)
    except OSError:
        shutil.rmtree(tmp)
    return site_dir
