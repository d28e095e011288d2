"""Typed reads of Flower record values.

A ConfigRecord or MetricRecord value is any of several scalars or lists; these narrow one to the
type the reader needs, converting scalars as int()/float()/str() would and refusing a list where a
scalar belongs (and a scalar where a list belongs) with a TypeError naming the found type.
"""

from __future__ import annotations

from typing import TypeVar

from flwr.app import ConfigRecord, MetricRecord

T = TypeVar("T")
Scalar = int | float | str | bytes | bool
ScalarList = list[int] | list[float] | list[str] | list[bytes] | list[bool]
RecordValue = Scalar | ScalarList


def scalar(value: RecordValue) -> Scalar:
    """The value itself, which must not be a list."""
    if isinstance(value, list):
        raise TypeError(f"expected a single value, got a list of {len(value)}")
    return value


def as_int(value: RecordValue) -> int:
    return int(scalar(value))


def as_float(value: RecordValue) -> float:
    return float(scalar(value))


def as_str(value: RecordValue) -> str:
    return str(scalar(value))


def as_bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes, got {type(value).__name__}")
    return value


def as_list(value: RecordValue) -> list[Scalar]:
    """The list itself (a copy), which must be a list."""
    if not isinstance(value, list):
        raise TypeError(f"expected a list, got {type(value).__name__}")
    return list(value)


def int_list(value: RecordValue) -> list[int]:
    return [int(item) for item in as_list(value)]


def bytes_list(value: RecordValue) -> list[bytes]:
    return [as_bytes(item) for item in as_list(value)]


def list_of(value: object, kind: type[T]) -> list[T] | None:
    """`value` if it is a list of `kind` items only, else None (for checking a peer's reply)."""
    if not isinstance(value, list):
        return None
    items = [item for item in value if isinstance(item, kind)]
    return items if len(items) == len(value) else None


def float_of(record: ConfigRecord | MetricRecord, key: str, default: float) -> float:
    """record[key] as a float, `default` when the record lacks the key."""
    return as_float(record[key]) if key in record else default
