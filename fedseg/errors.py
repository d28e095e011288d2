"""Helpers for error messages shown to a person (command lines, reports)."""

from __future__ import annotations

import re


def first_line(err: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most `limit` characters (its type name if empty):
    library errors can be long (torch's unpickling errors) or span lines (nibabel's affines)."""
    lines = str(err).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__


_LONG_NUMBER = re.compile(r"^(\W*[-+]?)(\d{25,})(\W*)$")  # a word that is a number of 25+ digits, maybe quoted
_LONG_WORD = 4096  # longer than any path (PATH_MAX): a pasted blob


def one_line(message: object) -> str:
    """`message` on one line, with what would bury the fault shortened: a number of more than 24 digits (a
    value like 1e308 written out) to its ends and its length, a word longer than any path to its ends."""
    words = []
    for word in str(message).split():
        word = _LONG_NUMBER.sub(lambda m: f"{m[1]}{m[2][:8]}…{m[2][-4:]} ({len(m[2])} digits){m[3]}", word)
        if len(word) > _LONG_WORD:
            word = f"{word[:150]}…{word[-150:]} ({len(word)} characters)"
        words.append(word)
    return " ".join(words)
