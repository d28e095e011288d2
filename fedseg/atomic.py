"""Atomic file writes: readers (and a crash) never see half a file."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
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

    The folder is named after this host and process and removed when the block fails, an interrupt
    included; a killed writer's folder for the same site is removed first (`remove_unfinished_site`)."""
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_unfinished_site(site_dir.parent, site_dir.name)
    prefix = f".{site_dir.name}-{socket.gethostname()}-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(dir=site_dir.parent, prefix=prefix, suffix=_STAGING_SUFFIX))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_unfinished_site(root: Path, name: str) -> None:
    """Remove the staging folders that writers killed on this host left under `root` for the site `name`
    (their process is gone); a live writer's folder, or another host's, stays."""
    for path in root.glob(f".{name}-*{_STAGING_SUFFIX}"):
        if path.is_dir() and not path.is_symlink() and _writer_is_gone(path.name[len(name) + 2 :]):
            shutil.rmtree(path, ignore_errors=True)


def _writer_is_gone(tag: str) -> bool:
    """Whether the staging folder tagged `<host>-<pid>-<random>.partial` belongs to a dead process of this host."""
    host, _, rest = tag.rpartition("-")[0].rpartition("-")
    if host != socket.gethostname() or not rest.isdigit():
        return False
    try:
        os.kill(int(rest), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's live process; not a pid
        return False
    return False


def publish_site_folder(tmp: Path, site_dir: Path, manifest: dict) -> Path:
    """Write `manifest` as `tmp/dataset.json`, then rename the fully written folder `tmp` to
    `site_dir`; if another process published the same folder first, keep theirs (identical)."""
    (tmp / "dataset.json").write_text(json.dumps(manifest, indent=2))
    try:
        os.replace(tmp, site_dir)
    except OSError:
        shutil.rmtree(tmp)
        if not (site_dir / "dataset.json").is_file():  # not another writer's site: a link, a file, a full disk
            raise
    return site_dir
