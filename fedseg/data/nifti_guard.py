"""Check what a NIfTI header claims before a single voxel is loaded.

nibabel and MONAI allocate what the header says the file holds before they read it, so a 66-byte
.nii.gz whose header claims 1024³ floats costs gigabytes before the read fails. `inspect_nifti`
reads the header only and refuses, with the file and the reason (`VolumeError`, a `SiteDataError`
whose public text holds only the kind):

    not-nifti       not a .nii / .nii.gz file, or no NIfTI header
    voxel-type      voxels fedseg cannot use: complex, RGB/structured, bool, > 64-bit
    dimensions      not 3D or 4D (channels last), an empty axis, or more than MAX_CHANNELS channels
    unreadable      the header claims more bytes than the file can hold: a .nii must hold them
                    all, a .nii.gz at most MAX_GZIP_RATIO × its size (deflate cannot compress more),
                    so a decompression bomb or a truncated file is refused from its size alone
    too-large       more than `max_voxels` voxels per channel, as stored or after resampling to the
                    run's spacing (default 512³; the site's own limit: $FEDSEG_MAX_VOXELS or the
                    commands' --max-voxels)
    affine-invalid  a non-finite or singular voxel-to-world matrix (no orientation or spacing)

Every reader of site or prediction data goes through here: validation (`fedseg.data.validate`),
the site's datasets (`guard_datalist`, before MONAI's LoadImaged) and `fedseg predict`.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from fedseg.data.datalist import NIFTI_SUFFIXES, SiteDataError
from fedseg.errors import first_line
from fedseg.limits import DEFAULT_MAX_VOXELS, MAX_CHANNELS, MAX_INTENSITY

MAX_VOXELS_ENV = "FEDSEG_MAX_VOXELS"
MAX_GZIP_RATIO = 1032  # deflate's largest compression ratio (RFC 1951: 258-byte matches in ~2 bits)
HEADER_BYTES = 352  # NIfTI-1 single-file header + extension flag; the data never starts earlier


class VolumeError(SiteDataError):
    """A volume's header claims something fedseg will not load; names the file (`path`) and the fault."""

    def __init__(self, kind: str, path: str | Path, fault: str) -> None:
        super().__init__(f"{path}: {fault}", f"site data invalid: 1 x {kind}")
        self.kind, self.path, self.fault = kind, str(path), fault


@dataclass(frozen=True)
class NiftiHeader:
    """What a checked header says: shape, voxel type and voxel-to-world matrix."""

    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    affine: np.ndarray
    image: nib.Nifti1Image  # the loaded header, its voxels not read yet

    @property
    def channels(self) -> int:
        return self.shape[3] if len(self.shape) == 4 else 1


_LIMIT: ContextVar[int | None] = ContextVar("fedseg_max_voxels", default=None)


@contextmanager
def voxel_limit(value: int | None) -> Iterator[None]:
    """Within the block, `max_voxels_setting()` is `value` (None: unchanged), e.g. a command's --max-voxels
    for every reader below it (validation, datasets, predict)."""
    token = _LIMIT.set(max_voxels_setting(value) if value is not None else _LIMIT.get())
    try:
        yield
    finally:
        _LIMIT.reset(token)


def max_voxels_setting(value: int | None = None) -> int:
    """The voxel limit per channel: `value`, else a `voxel_limit` block's, else $FEDSEG_MAX_VOXELS, else
    DEFAULT_MAX_VOXELS."""
    if value is None:
        value = _LIMIT.get()
    if value is None:
        raw = os.environ.get(MAX_VOXELS_ENV, "").strip()
        if not raw:
            return DEFAULT_MAX_VOXELS
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"${MAX_VOXELS_ENV}: must be a whole number of voxels, got {raw!r}") from None
        if value < 1:
            raise ValueError(f"${MAX_VOXELS_ENV}: must be >= 1, got {value}")
    elif value < 1:
        raise ValueError(f"max-voxels must be >= 1, got {value}")
    return value


def is_nifti_name(path: str | Path) -> bool:
    return Path(path).name.endswith(NIFTI_SUFFIXES)


def inspect_nifti(
    path: str | Path, max_voxels: int | None = None, pixdim: Sequence[float] | None = None
) -> NiftiHeader:
    """Read and check the header of `path` (see the module doc); VolumeError on any fault.
    `pixdim`: the spacing (mm) the volume will be resampled to, whose voxel count is bounded too."""
    path = Path(path)
    limit = max_voxels_setting(max_voxels)
    if not is_nifti_name(path):
        raise VolumeError("not-nifti", path, "not a NIfTI file (.nii or .nii.gz expected)")
    try:
        size = path.stat().st_size
        image = nifti_image(path)
        header = image.header
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        offset = int(header.get_data_offset())
        affine = np.asarray(image.affine, dtype=np.float64)
    except VolumeError:
        raise
    except Exception as err:  # noqa: BLE001 - nibabel parses untrusted bytes: any failure means unreadable
        raise VolumeError(
            "unreadable",
            path,
            f"cannot read the NIfTI header (corrupt or truncated?): {type(err).__name__}: {first_line(err)}",
        ) from None
    if dtype.kind not in "iuf" or dtype.itemsize > 8:
        kind = {"c": "complex", "V": "RGB or structured", "b": "boolean"}.get(dtype.kind, "unsupported")
        raise VolumeError("voxel-type", path, f"{kind} voxels ({dtype}) cannot be used; store real numbers")
    if len(shape) not in (3, 4):
        raise VolumeError("dimensions", path, f"a 3D or 4D (channels last) volume is needed, got shape {shape}")
    if min(shape) < 1:
        raise VolumeError("dimensions", path, f"empty volume: shape {shape}")
    if len(shape) == 4 and shape[3] > MAX_CHANNELS:
        raise VolumeError("dimensions", path, f"{shape[3]} channels on the 4th axis; at most {MAX_CHANNELS}")
    voxels = math.prod(shape)
    claimed = max(offset, HEADER_BYTES if path.name.endswith(".nii") else 0) + voxels * dtype.itemsize
    compressed = path.name.endswith(".gz")
    holds = size * MAX_GZIP_RATIO + 1024 if compressed else size
    if claimed > holds:
        what = f"a {size:,}-byte .nii.gz can hold at most {holds:,}" if compressed else f"the file has {size:,}"
        raise VolumeError(
            "unreadable",
            path,
            f"header claims shape {shape} of {dtype} ({claimed:,} bytes) but {what}:"
            " corrupt, truncated or a decompression bomb",
        )
    spatial = math.prod(shape[:3])
    if spatial > limit:
        raise VolumeError(
            "too-large",
            path,
            f"{_size(shape[:3])} = {spatial:,} voxels per channel exceeds this site's "
            f"limit of {limit:,} (--max-voxels / ${MAX_VOXELS_ENV})",
        )
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise VolumeError(
            "affine-invalid",
            path,
            "voxel-to-world matrix is non-finite or singular (no valid spacing or orientation in the header)",
        )
    if pixdim is not None:
        zooms = np.linalg.norm(affine[:3, :3], axis=0)
        resampled = math.prod(max(1.0, n * z / p) for n, z, p in zip(shape[:3], zooms, pixdim, strict=True))
        if resampled > limit:
            raise VolumeError(
                "too-large",
                path,
                f"resampled from {_fmt(zooms)} mm to {_fmt(pixdim)} mm it would have "
                f"{resampled:,.0f} voxels per channel, over this site's limit of "
                f"{limit:,} (--max-voxels / ${MAX_VOXELS_ENV})",
            )
    return NiftiHeader(path, shape, dtype, affine, image)


def nifti_image(path: str | Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """nibabel's (lazy) image of `path`; VolumeError when nibabel reads it as another kind of image."""
    image = nib.load(str(path))
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError("not-nifti", Path(path), f"not a NIfTI image ({type(image).__name__})")
    return image


def load_nifti(
    path: str | Path, max_voxels: int | None = None, pixdim: Sequence[float] | None = None
) -> tuple[NiftiHeader, np.ndarray]:
    """The checked header and the voxels (read only once the header passed); VolumeError on any fault."""
    header = inspect_nifti(path, max_voxels, pixdim)
    try:
        data = np.asanyarray(header.image.dataobj)
    except Exception as err:  # noqa: BLE001 - as above; the size was bounded by the header checks
        raise VolumeError("unreadable", path, f"cannot read (corrupt or truncated?): {first_line(err)}") from None
    return header, data


def guard_datalist(items: Iterable[dict], pixdim: Sequence[float] | None = None, max_voxels: int | None = None) -> None:
    """Check the header of every image and label of MONAI datalist `items` before anything loads
    them; one SiteDataError naming every faulty file (its public text: counts of each kind)."""
    faults: list[VolumeError] = []
    for item in items:
        for key in ("image", "label"):
            value = item.get(key)
            for path in [value] if isinstance(value, (str, Path)) else list(value or []):
                try:
                    inspect_nifti(path, max_voxels, pixdim)
                except VolumeError as err:
                    faults.append(err)
    if faults:
        kinds = Counter(err.kind for err in faults)
        public = "site data invalid: " + ", ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items()))
        raise SiteDataError("; ".join(map(str, faults)), public)


def _size(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _fmt(values: Iterable[float]) -> str:
    return ",".join(f"{float(v):g}" for v in values)


def unusable_voxels(data: np.ndarray) -> int:
    """Voxels that are NaN, infinite or beyond ±MAX_INTENSITY (fedseg.limits); two passes without a copy
    when there are none."""
    if data.size == 0:
        return 0
    low, high = data.min(), data.max()
    if np.isfinite(low) and np.isfinite(high) and low >= -MAX_INTENSITY and high <= MAX_INTENSITY:
        return 0
    return int(data.size - np.count_nonzero(np.abs(data.astype(np.float64, copy=False)) <= MAX_INTENSITY))
