"""Helpers for error messages shown to a person (command lines, reports)."""

from __future__ import annotations


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters (its type name if empty):
    library errors can be long (torch's unpickling errors) or span lines (nibabel's affines)."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__
