"""Strategy state that holds arrays, as values checkpoint.pt can store and `torch.load(weights_only=True)`
reads back exactly: numpy arrays become torch tensors (same dtype and bits), containers are tagged.

    encode(value) → None, bool, int, float, str, or a one-key dict:
        {"ndarray": tensor}  {"scalar": 0-d tensor}  {"arrays": {key: tensor}} (an ArrayRecord)
        {"dict": {str: encoded}}  {"list": [encoded]}  {"tuple": [encoded]}
    decode(encode(value)) == value, bit for bit (numpy scalars keep their dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

PLAIN = (type(None), bool, int, float, str)


def encode(value: Any, where: str = "state") -> Any:
    """`value` in checkpoint-safe form; ValueError naming `where` for a type it cannot store."""
    if isinstance(value, np.generic):  # before PLAIN: np.float64 is a float, and would be pickled as numpy's
        return {"scalar": _tensor(np.asarray(value), where)}
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, np.ndarray):
        return {"ndarray": _tensor(value, where)}
    if isinstance(value, ArrayRecord):
        return {"arrays": {key: _tensor(array.numpy(), f"{where}[{key!r}]") for key, array in value.items()}}
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return {"dict": {key: encode(item, f"{where}[{key!r}]") for key, item in value.items()}}
    if isinstance(value, (list, tuple)):
        items = [encode(item, f"{where}[{i}]") for i, item in enumerate(value)]
        return {"list" if isinstance(value, list) else "tuple": items}
    raise ValueError(f"{where}: cannot checkpoint a {type(value).__name__}")


def decode(value: Any) -> Any:
    """The value `encode` was given."""
    if isinstance(value, PLAIN):
        return value
    ((kind, item),) = value.items()
    if kind == "ndarray":
        return item.numpy().copy()
    if kind == "scalar":
        return item.numpy()[()]
    if kind == "arrays":
        return ArrayRecord({key: Array(tensor.numpy().copy()) for key, tensor in item.items()})
    if kind == "dict":
        return {key: decode(entry) for key, entry in item.items()}
    if kind in ("list", "tuple"):
        items = [decode(entry) for entry in item]
        return items if kind == "list" else tuple(items)
    raise ValueError(f"unknown encoded state kind {kind!r}")


def _tensor(array: np.ndarray, where: str) -> torch.Tensor:
    try:
        return torch.from_numpy(np.array(array, copy=True, order="C"))
    except TypeError as err:
        raise ValueError(f"{where}: cannot checkpoint a {array.dtype} array: {err}") from None
