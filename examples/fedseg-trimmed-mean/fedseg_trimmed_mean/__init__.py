"""`trimmed-mean`: per coordinate, drop the largest and smallest `trim-fraction` of the site values
and average the rest (Yin et al. 2018), so one outlying site cannot pull the model far.

An example fedseg strategy plugin: a subclass of `FedSegStrategy` that declares its parameter
and overrides `combine`; replies reach `combine` already checked (keys, shapes, dtypes, finite).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from scipy.stats import trim_mean

from strategies.aggregate import array_view, is_float
from strategies.base import FedSegStrategy, Reply
from strategies.params import Param


class TrimmedMean(FedSegStrategy):
    """Coordinate-wise trimmed mean of the site models (every site counts once)."""

    name = "trimmed-mean"
    params = (Param("trim-fraction", float, 0.2, "share of the highest and of the lowest values cut per coordinate",
                    minimum=0.0, maximum=0.49),)
    trim_fraction: float

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        out = {}
        for key, reference in self.global_arrays.items():
            ref = array_view(reference)
            if is_float(ref):
                stacked = np.stack([array_view(r.arrays[key]) for r in replies])  # one tensor, all sites
                value = trim_mean(stacked, self.trim_fraction, axis=0).astype(ref.dtype)
            else:
                value = ref  # integer buffers keep the global value
            out[key] = Array(np.ascontiguousarray(value))
        return ArrayRecord(out)

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {**super().round_report(server_round), "trim-fraction": self.trim_fraction}
