"""Fixed-point encoding of a weighted model update in the ring of integers modulo 2^64.

A site with weight a (its `num-examples`) encodes its update Δ = w − g (its model minus the global
model it received, every array in sorted key order, flattened) as

    x = round(a · Δ · 2^f)   (f = FRACTION_BITS for floating arrays, 0 for integer buffers)

stored as uint64: two's complement makes addition modulo 2^64 exact integer addition as long as
the true sum stays inside (−2^63, 2^63). The server adds the masked vectors, removes the masks and
divides by Σ a · 2^f. Error: every site rounds each coordinate by at most 1/2, so the weighted mean
update is off by at most n / (2 · Σa · 2^f) ≤ 2^−(f+1) ≈ 1.2e−10 per coordinate before the cast to
float32; integer buffers come out as FedAvg's rounded weighted mean exactly.

Overflow cannot happen silently: each site checks |Δ| ≤ `secure-aggregation-bound` (B) on its
floating arrays and |Δ| ≤ INTEGER_BOUND on integer buffers before it encodes, and the server checks
from the public weights that Σa · max(B · 2^f, INTEGER_BOUND) + n < 2^63 before it unmasks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord
from numpy.typing import ArrayLike

from strategies.aggregate import BLOCK, array_view, is_float

FRACTION_BITS = 32
INTEGER_BOUND = 2.0**31  # largest |Δ| of an integer buffer (BatchNorm's num_batches_tracked) a site may send
RING_LIMIT = 2.0**63


def keys_of(arrays: ArrayRecord | Mapping[str, object]) -> list[str]:
    """The order in which both sides flatten a model: sorted keys (independent of transport order)."""
    return sorted(arrays)


def layout(reference: ArrayRecord) -> list[tuple[str, np.ndarray]]:
    """(key, read-only view) of the reference model's arrays in encoding order."""
    return [(key, array_view(reference[key])) for key in keys_of(reference)]


@dataclass(frozen=True)
class UpdateStats:
    """What the site's own checks need to know about its update Δ (measured while encoding)."""

    finite: bool
    float_norm: float  # ‖Δ‖ over the floating arrays
    float_max: float  # max |Δ| over the floating arrays
    integer_max: float  # max |Δ| over the integer buffers


def update_norm(reference: ArrayRecord, weights: Mapping[str, ArrayLike]) -> float:
    """‖Δ‖ over the floating arrays (what a site clips by under distributed DP)."""
    squared = 0.0
    for key, ref in layout(reference):
        if is_float(ref):
            own_flat, ref_flat = np.asarray(weights[key]).reshape(-1), ref.reshape(-1)
            for start in range(0, ref.size, BLOCK):
                delta = own_flat[start : start + BLOCK].astype(np.float64)
                delta -= ref_flat[start : start + BLOCK]
                squared += float(np.dot(delta, delta))
    return float(np.sqrt(squared))


def encode_update(
    reference: ArrayRecord,
    weights: Mapping[str, ArrayLike],
    weight: float,
    clip_scale: float = 1.0,
    noise: Callable[[int], np.ndarray] | None = None,
) -> tuple[np.ndarray, UpdateStats]:
    """round(weight · Δ · 2^f) (2^0 on integer buffers) as uint64 words (two's complement) in
    encoding order, and the update's statistics; computed block by block in float64 (Δ of float32
    weights is exact there), so no model-sized float64 temporaries exist.

    Distributed DP: floating values are sent as clip_scale · Δ + noise(size) and integer buffers as 0
    (they keep the global model's value, as in dp-noised) once `noise` is given; `float_max` is then
    measured on the values sent, the other statistics on Δ."""
    specs = layout(reference)
    out = np.empty(sum(ref.size for _, ref in specs), np.int64)
    finite, squared, float_max, integer_max = True, 0.0, 0.0, 0.0
    offset = 0
    for key, ref in specs:
        own = np.asarray(weights[key])
        if own.shape != ref.shape:
            raise ValueError(f"array '{key}' has shape {list(own.shape)}, the global model {list(ref.shape)}")
        floating = is_float(ref)
        scale = weight * 2.0**FRACTION_BITS if floating else weight
        own_flat, ref_flat = own.reshape(-1), ref.reshape(-1)
        for start in range(0, ref.size, BLOCK):
            delta = own_flat[start : start + BLOCK].astype(np.float64)
            delta -= ref_flat[start : start + BLOCK]
            largest = float(np.abs(delta).max()) if delta.size else 0.0
            finite = finite and np.isfinite(largest)
            if floating:
                squared += float(np.dot(delta, delta))
                if noise is not None:
                    delta *= clip_scale
                    delta += noise(delta.size)
                    largest = float(np.abs(delta).max()) if delta.size else 0.0
                float_max = max(float_max, largest)
            else:
                integer_max = max(integer_max, largest)
                if noise is not None:
                    delta[:] = 0.0
            delta *= scale
            np.rint(delta, out=delta)
            if finite:
                out[offset + start : offset + start + delta.size] = delta
        offset += ref.size
    return out.view(np.uint64), UpdateStats(finite, float(np.sqrt(squared)), float_max, integer_max)


def fits(total_weight: float, bound: float, participants: int) -> bool:
    """True when the true sum of the encoded updates cannot leave (−2^63, 2^63)."""
    largest = max(bound * 2.0**FRACTION_BITS, INTEGER_BOUND)
    return total_weight * largest + participants < RING_LIMIT


def decode(total: np.ndarray, total_weight: float, reference: ArrayRecord) -> ArrayRecord:
    """The global model plus the weighted mean update, each array in the reference's dtype
    (integer buffers rounded, as FedAvg does)."""
    signed = total.view(np.int64)
    out: dict[str, Array] = {}
    offset = 0
    for key, ref in layout(reference):
        part = signed[offset : offset + ref.size].astype(np.float64)
        offset += ref.size
        if is_float(ref):
            mean = part / (total_weight * 2.0**FRACTION_BITS)
            value = ref.astype(np.float64).ravel() + mean
        else:
            value = np.rint(ref.astype(np.float64).ravel() + part / total_weight)
        out[key] = Array(np.array(value.reshape(ref.shape), dtype=ref.dtype, order="C"))
    if offset != signed.size:
        raise ValueError(f"aggregate has {signed.size} values, the model {offset}")
    return ArrayRecord({key: out[key] for key in reference})
