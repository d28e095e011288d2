"""Atomic file writes: readers (and a crash) never see half a file."""

from __future__ import annotations

import json
import os
import shutil
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


def publish_site_folder(tmp: Path, site_dir: Path, manifest: dict) -> Path:
    """Write `manifest` as `tmp/dataset.json`, then rename the fully written folder `tmp` to
    `site_dir`; if another process published the same folder first, keep theirs (identical)."""
    (tmp / "dataset.json").write_text(json.dumps(manifest, indent=2))
    try:
        os.replace(tmp, site_dir)
    except OSError:
        shutil.rmtree(tmp)
    return site_dir
