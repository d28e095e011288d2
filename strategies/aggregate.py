"""Array arithmetic for strategies: zero-copy views of replies, update norms and weighted sums in one pass.

Replies are read through read-only views of their serialized bytes, never copied. `sweep` walks
each tensor block by block (`BLOCK` elements): a block of the global model, the running sum and
one work buffer stay in cache while every reply's block is read once from memory, so checking
(update norms, non-finite values) and averaging N replies costs about one read of each reply plus
one write of the output model, with no tensor-sized temporaries. Sums accumulate in the array's
dtype in reply order, the arithmetic of Flower's FedAvg: float32 stays float32, and integer
buffers (BatchNorm's `num_batches_tracked`) stay integers.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord
from scipy.linalg import blas
from threadpoolctl import ThreadpoolController

from fedseg.flower_compat import SType

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
_LENGTH_BYTES = {1: 2, 2: 4}  # size of the little-endian header length field after the 8-byte magic
# elements per block (512 KB of float32): reused blocks stay in L2/L3 cache, Python's per-call cost is small
BLOCK = 131_072


def array_view(array: Array) -> np.ndarray:
    """Read-only numpy view of an Array's serialized data (no copy); ValueError if it is malformed."""
    data = array.data
    prefix = bytes(data[:8])
    if len(prefix) < 8 or not prefix.startswith(np.lib.format.MAGIC_PREFIX):
        raise ValueError("not .npy data (bad magic string)")
    width = _LENGTH_BYTES.get(prefix[6])
    if width is None or prefix[7] != 0:
        raise ValueError(f"unsupported .npy format version {(prefix[6], prefix[7])}")
    offset = 8 + width + int.from_bytes(data[8 : 8 + width], "little")
    shape, fortran_order, dtype = _parse_header(bytes(data[:offset]))
    flat = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
    return flat.reshape(shape, order="F" if fortran_order else "C")


@lru_cache(maxsize=4096)
def _parse_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of a .npy header; memoised, as every site sends the same headers."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version not in _HEADER_READERS:
        raise ValueError(f"unsupported .npy format version {version}")
    shape, fortran_order, dtype = _HEADER_READERS[version](stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return shape, fortran_order, dtype


def is_float(array: np.ndarray) -> bool:
    """True for floating-point arrays (weights, BatchNorm statistics), False for integer counters."""
    return bool(np.issubdtype(array.dtype, np.floating))


Measure = Literal["distance", "norm", "none"]
Records = Sequence[ArrayRecord | Mapping[str, np.ndarray]]  # ArrayRecords or their arrays' views by key


@dataclass(frozen=True)
class Sweep:
    """What one pass over the records found: per record and floating array the squared distance
    ‖x − reference‖² (measure "distance") or squared norm ‖x‖² ("norm"), NaN or inf where the
    array holds non-finite values; the reference's squared norm; the weighted sum when
    coefficients were given."""

    squared: list[dict[str, float]]
    reference_squared: float
    arrays: ArrayRecord | None


def sweep(
    reference: ArrayRecord,
    records: Records,
    coefficients: Sequence[float] | None = None,
    *,
    measure: Measure = "distance",
    reference_coefficient: float = 0.0,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
    average_integers: bool = True,
) -> Sweep:
    """Read every record once, block by block: squared distances to the reference or squared norms
    (`measure`) and, with `coefficients`, Σ cᵢ·recordᵢ + c₀·reference (+ Gaussian noise) per
    floating array. A norm costs a fraction of a distance (no difference to form).

    Records must match the reference's keys, shapes and dtypes. Integer arrays are never noised
    nor measured: with `average_integers` they become the rounded mean of the records weighted by
    the coefficients (normalised), otherwise they keep the reference's value.
    """
    found: list[dict[str, float]] = [{} for _ in records]
    reference_squared = 0.0
    out: dict[str, Array] = {}
    work = _Blocks()
    noise = (rng or np.random.default_rng()) if noise_std > 0 else None
    with _blas_threads().limit(limits=1, user_api="blas"):  # on block-sized calls extra BLAS threads only stall
        for key, ref_array in reference.items():
            ref = array_view(ref_array)
            views = [_view(record, key) for record in records]
            data: io.BytesIO | np.ndarray | None
            if is_float(ref):
                squared, ref_squared, data = _float_pass(
                    ref, views, coefficients, reference_coefficient, measure, noise_std, noise, work
                )
                reference_squared += ref_squared
                for record_found, value in zip(found, squared, strict=True):
                    record_found[key] = value
            elif coefficients is None:
                continue
            else:
                data = _integer_mean(ref, views, coefficients) if average_integers else ref
            if coefficients is not None:
                assert data is not None  # _float_pass fills a stream whenever coefficients are given
                out[key] = _as_array(data, ref)
    return Sweep(found, reference_squared, ArrayRecord(out) if coefficients is not None else None)


def weighted_sum(
    reference: ArrayRecord, records: Records, coefficients: Sequence[float], **options: Any
) -> ArrayRecord:
    """Σ cᵢ·recordᵢ (+ `sweep`'s options) in the reference's key order, measuring nothing."""
    result = sweep(reference, records, coefficients, measure="none", **options).arrays
    assert result is not None
    return result


def _view(record: ArrayRecord | Mapping[str, np.ndarray], key: str) -> np.ndarray:
    value = record[key]
    return value if isinstance(value, np.ndarray) else array_view(value)


class _Blocks:
    """Block-sized work buffers (a difference, a running sum), one pair per dtype."""

    def __init__(self) -> None:
        self._buffers: dict[np.dtype, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        if dtype not in self._buffers:
            self._buffers[dtype] = (np.empty(BLOCK, dtype), np.empty(BLOCK, dtype))
        return self._buffers[dtype]


def _numpy_dot(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.einsum("i,i->", x, y))


def _numpy_axpy(x: np.ndarray, y: np.ndarray, a: float) -> np.ndarray:
    return np.add(y, np.multiply(x, a), out=y)


@lru_cache(maxsize=1)
def _blas_threads() -> ThreadpoolController:
    """The process's thread pools (BLAS among them), inspected once: each inspection costs ~2 ms."""
    return ThreadpoolController()


def _kernels(dtype: np.dtype) -> tuple[Any, Any]:
    """(dot, axpy) for one dtype: BLAS's single-pass level-1 routines for float32/float64, numpy for
    other floats (float16). `sweep` holds BLAS to the calling thread: OpenBLAS spreads axpy over
    threads from 16 384 elements, and on a busy machine those threads stall (measured)."""
    if dtype in (np.float32, np.float64):
        dot, axpy = blas.get_blas_funcs(("dot", "axpy"), dtype=dtype)
        return dot, axpy
    return _numpy_dot, _numpy_axpy


def _float_pass(
    ref: np.ndarray,
    views: Sequence[np.ndarray],
    coefficients: Sequence[float] | None,
    ref_coefficient: float,
    measure: Measure,
    noise_std: float,
    rng: np.random.Generator | None,
    work: _Blocks,
) -> tuple[list[float], float, io.BytesIO | None]:
    """One floating tensor: per block of the reference, each record's block is read once from
    memory and then from cache (total += c·block; its squared norm, or its difference to the
    reference and that one's squared norm), while the reference block, the running sum and the
    difference stay in cache."""
    reference, flats = ref.reshape(-1), [view.reshape(-1) for view in views]  # copies only non-C-order data
    scratch, running = work.get(ref.dtype)
    dot, axpy = _kernels(ref.dtype)
    squared, ref_squared = [0.0] * len(flats), 0.0
    out = None if coefficients is None else _npy_stream(ref)
    weights = coefficients or [0.0] * len(flats)
    norms, distances = measure == "norm", measure == "distance"
    for start in range(0, reference.size, BLOCK):
        stop = start + BLOCK
        block = reference[start:stop]
        diff, total = scratch[: block.size], running[: block.size]
        if measure != "none":
            ref_squared += dot(block, block)
        if out is not None and ref_coefficient:
            np.multiply(block, ref_coefficient, out=total)
        elif out is not None:
            total.fill(0)
        for i, (flat, weight) in enumerate(zip(flats, weights, strict=True)):
            part = flat[start:stop]
            if out is not None:  # first: the one read from memory, by the fastest streaming routine
                total = axpy(part, total, a=weight)
            if norms:
                squared[i] += dot(part, part)  # NaN or inf if the block holds non-finite values
            elif distances:
                squared[i] += dot(np.subtract(part, block, out=diff), diff)
        if out is not None:
            if rng is not None:  # sweep passes one exactly when noise_std > 0
                total += rng.normal(0.0, noise_std, size=total.size)
            out.write(total.data)
    return squared, ref_squared, out


def _integer_mean(ref: np.ndarray, views: Sequence[np.ndarray], coefficients: Sequence[float]) -> np.ndarray:
    """Rounded mean of integer arrays weighted by the (normalised) coefficients, computed in float64."""
    scale = sum(coefficients)
    total = np.zeros(ref.shape, np.float64)
    for view, coefficient in zip(views, coefficients, strict=True):
        total += view * (coefficient / scale)
    return np.rint(total)


def _npy_stream(ref: np.ndarray) -> io.BytesIO:
    """A BytesIO holding a C-order .npy header for `ref`, sized for its data (no regrowth)."""
    stream = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(ref.dtype), "fortran_order": False, "shape": ref.shape}
    np.lib.format.write_array_header_1_0(stream, header)
    end = stream.tell() + ref.nbytes
    if ref.nbytes:
        stream.seek(end - 1)
        stream.write(b"\0")
        stream.seek(end - ref.nbytes)
    return stream


def _as_array(data: io.BytesIO | np.ndarray | np.generic, ref: np.ndarray) -> Array:
    """An Array of `ref`'s dtype and shape from a filled .npy stream or from values to cast."""
    if isinstance(data, io.BytesIO):
        return Array(dtype=str(ref.dtype), shape=tuple(ref.shape), stype=SType.NUMPY, data=data.getvalue())
    return Array(np.ascontiguousarray(data, dtype=ref.dtype).reshape(ref.shape))  # 0-d stays 0-d
