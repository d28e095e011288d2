"""JSON records fedseg writes and reads back (experiment.json, arm.json, history.json, a site's split,
validation memo and privacy ledger, a bundle's metadata.json): a broken, tampered or oversized one is a
one-line fault naming the file, never a parser's traceback; `record_text`, `record_int` and `record_float`
check one value of a record the same way."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fedseg.limits import MAX_RECORD_BYTES

MAX_NUMBER = 2**53  # largest number a record holds: ints up to it are exact as floats, and sums of them finite


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; ValueError "<path>: <fault>" when it cannot be read, is larger than
    MAX_RECORD_BYTES or is not an object."""
    raw = _read_bounded(path)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{path}: not a readable JSON record ({type(err).__name__})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a JSON object")
    return data


def fault_without_path(path: Path, err: BaseException) -> str:
    """`err`'s message without the "<path>: " that `read_json_object` puts first, for a caller that names
    the file itself; other errors as "<type>: <message>"."""
    message, prefix = str(err), f"{path}: "
    return message.removeprefix(prefix) if message.startswith(prefix) else f"{type(err).__name__}: {message}"


def record_text(path: Path, key: str, value: object) -> str:
    """`value` of the record's `key`: a non-empty string of printable characters; ValueError naming both."""
    if not isinstance(value, str) or not value or not value.isprintable():
        raise ValueError(f"{path}: '{key}' must be a non-empty string of printable characters")
    return value


def record_int(path: Path, key: str, value: object) -> int:
    """`value` of the record's `key`: an int (not a bool) in [0, MAX_NUMBER]; ValueError naming both."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_NUMBER:
        raise ValueError(f"{path}: '{key}' must be an integer in [0, 2**53], got {_described(value)}")
    return value


def record_float(path: Path, key: str, value: object, upper: float = MAX_NUMBER, *, nan: bool = False) -> float:
    """`value` of the record's `key`: an int or float (not a bool) in [0, upper], or NaN where `nan` allows
    it; ValueError naming both."""
    if nan and isinstance(value, float) and math.isnan(value):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= upper:
        limit = "2**53" if upper == MAX_NUMBER else f"{upper:g}"
        allowed = f"a number in [0, {limit}]{' or NaN' if nan else ''}"
        raise ValueError(f"{path}: '{key}' must be {allowed}, got {_described(value)}")
    return float(value)


def _read_bounded(path: Path) -> bytes:
    """The file's bytes; ValueError naming it when it cannot be read or is larger than MAX_RECORD_BYTES
    (from its size before reading, and by a bounded read where the size says nothing: a device, /proc)."""
    try:
        size = path.stat().st_size
        raw = b"" if size > MAX_RECORD_BYTES else _head(path, MAX_RECORD_BYTES + 1)
    except OSError as err:
        raise ValueError(f"{path}: not a readable JSON record ({type(err).__name__})") from None
    if max(size, len(raw)) > MAX_RECORD_BYTES:
        raise ValueError(f"{path}: larger than the {MAX_RECORD_BYTES // 2**20} MiB a JSON record may have")
    return raw


def _head(path: Path, size: int) -> bytes:
    with path.open("rb") as handle:
        return handle.read(size)


def _described(value: object) -> str:
    """A refused value in a few characters: a string may be megabytes long, an int hundreds of digits."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return type(value).__name__
    return f"{value:g}" if isinstance(value, float) or abs(value) < 10**15 else "an integer of more than 15 digits"
