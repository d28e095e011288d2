"""Weights between Flower records and torch without needless copies.

Receiving: the tensors view the record's serialized bytes (read-only, no copy); loading them into
the model is the only copy. Sending: Flower's ArrayRecord serializes the state dict once.
"""

from __future__ import annotations

import warnings

import torch
from flwr.app import ArrayRecord

from strategies.aggregate import array_view


def state_from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Read-only tensors over the record's bytes, for `load_state_dict` (which copies them in)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return {key: torch.from_numpy(array_view(array)) for key, array in record.items()}
