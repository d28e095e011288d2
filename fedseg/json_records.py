"""JSON records fedseg writes and reads back (experiment.json, arm.json, history.json): a broken or
tampered one is a one-line fault naming the file, never a parser's traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError "<path>: <fault>" when it cannot be read or is not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a readable JSON record ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data
