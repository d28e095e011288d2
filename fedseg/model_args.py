"""run-config `model-args`: a network's keyword arguments as one string, e.g.
`"init_filters=16, dropout_prob=0.1, norm=batch, channels=(16, 32, 64)"`.

Flower's run config is flat (and `flwr run --run-config` overrides only keys it knows), so the
arguments are written as Python keyword arguments and read with `ast.literal_eval` per value:
numbers, strings, True/False/None, tuples, lists and dicts of those. A bare word (`norm=batch`) is a
string. Nothing is executed.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from typing import Any


class ModelArgsError(ValueError):
    """`model-args` is not a list of keyword arguments with plain values."""


def parse_model_args(text: str) -> dict[str, Any]:
    """`"a=1, b=(2, 3)"` → `{"a": 1, "b": (2, 3)}`; ModelArgsError naming the bad argument."""
    if not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise ModelArgsError(
            f'{text!r} is not a list of name=value pairs, e.g. "init_filters=16, dropout_prob=0.1"'
        ) from None
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        raise ModelArgsError(f"{text!r}: give every argument as name=value (no positional arguments)")
    args: dict[str, Any] = {}
    for name, value in ((kw.arg, kw.value) for kw in call.keywords if kw.arg is not None):  # all named (above)
        if name in args:
            raise ModelArgsError(f"argument '{name}' is given twice")
        args[name] = _literal(name, value)
    return args


def format_model_args(args: Mapping[str, Any]) -> str:
    """The inverse of `parse_model_args` (for logs and model descriptions)."""
    return ", ".join(f"{name}={value!r}" for name, value in args.items())


def _literal(name: str, node: ast.expr) -> Any:
    if isinstance(node, ast.Name) and node.id not in {"True", "False", "None"}:
        return node.id  # a bare word is a string: norm=batch
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ModelArgsError(
            f"argument '{name}' = {ast.unparse(node)} is not a plain value (a number, string, "
            "True/False/None, or a tuple, list or dict of those)"
        ) from None
