"""`trimmed-mean`: a coordinate-wise trimmed mean in which each site counts by its weight (its
training examples, or whatever `site_weights` says), so trimming cuts a share of the *weight*,
not a number of sites — something Flower's FedTrimmedAvg (every site counts once, whole sites
cut) does not do.

Per coordinate, with the sites' values sorted, x₍₁₎ ≤ … ≤ x₍ₙ₎, and their normalised weights
w₍ₖ₎ (Σ w = 1) laid end to end on [0, 1] — site k covers [Wₖ₋₁, Wₖ], Wₖ = w₍₁₎ + … + w₍ₖ₎:

    eₖ = |[Wₖ₋₁, Wₖ] ∩ [τ, 1 − τ]|              (the part of site k's weight that is kept)
    w_global = Σₖ eₖ · x₍ₖ₎ / (1 − 2τ)

τ is `trim-fraction`. With equal weights and τ·n an integer this is the ordinary trimmed mean
(Yin et al. 2018) and matches Flower's FedTrimmedAvg; with integer weights it equals the ordinary
trimmed mean of each site's value repeated weight times. A site with more than τ of the weight is
never cut out entirely, and a few small outlying sites are. Integer buffers (BatchNorm's
`num_batches_tracked`) keep the global model's value.

An example fedseg strategy plugin: a subclass of `FedSegStrategy` that declares its parameter,
overrides `combine` (replies arrive checked: keys, shapes, dtypes, finite values, update norms)
and reports per-round entries for history.json.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord

from strategies.aggregate import array_view, is_float
from strategies.base import FedSegStrategy, Reply
from strategies.params import Param


def weighted_trimmed_mean(stacked: np.ndarray, weights: np.ndarray, trim: float) -> np.ndarray:
    """The formula above along axis 0 of `stacked` (one row per site, `weights` one per site), in float64."""
    order = np.argsort(stacked, axis=0, kind="stable")
    values = np.take_along_axis(stacked, order, axis=0).astype(np.float64)
    sorted_weights = (weights / weights.sum())[order]
    upper = np.cumsum(sorted_weights, axis=0)
    kept = np.clip(np.minimum(upper, 1.0 - trim) - np.maximum(upper - sorted_weights, trim), 0.0, None)
    return (kept * values).sum(axis=0) / kept.sum(axis=0)


class TrimmedMean(FedSegStrategy):
    """Coordinate-wise trimmed mean that cuts a share of the sites' weight (examples) at each end."""

    name = "trimmed-mean"
    params = (
        Param(
            "trim-fraction",
            float,
            0.2,
            "share of the total weight cut at each end, per coordinate",
            minimum=0.0,
            maximum=0.49,
        ),
    )
    trim_fraction: float

    def __init__(self, min_sites: int = 2, **params: Any) -> None:
        super().__init__(min_sites, **params)
        self._weights: dict[str, float] = {}

    def combine(self, server_round: int, replies: list[Reply]) -> ArrayRecord:
        weights = np.asarray(self.site_weights(replies), dtype=np.float64)
        self._weights = {r.site: float(w) for r, w in zip(replies, weights / weights.sum(), strict=True)}
        out = {}
        for key, reference in self.global_arrays.items():
            ref = array_view(reference)
            if is_float(ref):
                stacked = np.stack([r.views[key] for r in replies]).reshape(len(replies), -1)
                value = weighted_trimmed_mean(stacked, weights, self.trim_fraction)
                value = value.reshape(ref.shape).astype(ref.dtype)
            else:
                value = ref
            out[key] = Array(np.ascontiguousarray(value))
        return ArrayRecord(out)

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {
            **super().round_report(server_round),
            "trim-fraction": self.trim_fraction,
            "weights": dict(self._weights),
        }
