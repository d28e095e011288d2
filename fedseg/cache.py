"""fedseg's cache folder on this machine: $FEDSEG_CACHE, else ~/.cache/fedseg."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Base folder for generated synthetic sites and per-site state (preprocessing cache, ε ledgers)."""
    return Path(os.environ.get("FEDSEG_CACHE", Path.home() / ".cache" / "fedseg"))
