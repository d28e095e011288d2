"""Check a site's data before it joins a federation; report every problem, not only the first.

Each problem has a kind code (stable, for scripts and tests), the file and a description:

    not-a-site, manifest, missing-file, image-without-label, label-without-image, duplicate-id,
    outside-site      (layout, from `scan_site`)
    unreadable        file cannot be read or is corrupt (e.g. a truncated .nii.gz, or a header that
                      claims more voxels than the file can hold)
    not-nifti, voxel-type, too-large, affine-invalid
                      the header checks of fedseg.data.nifti_guard, made before any voxel is read
    dimensions        image not 3D/4D, or label not 3D
    shape-mismatch    image and label (or two modalities) differ in voxel grid shape
    affine-mismatch   voxel spacing, orientation or origin differ beyond the tolerance
    non-finite        NaN or infinite voxels; in an image also |value| > fedseg.limits.MAX_INTENSITY
    label-values      label values non-integer, negative, above MAX_LABEL_VALUE, or outside the
                      declared classes
    empty-label       label has no foreground (warning)
    channels          channel count differs from the expected one, or between subjects
    too-few-subjects  not enough usable subjects for a train / validation / test split
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from fedseg.data.datalist import Problem, SiteDataError, Subject, public_summary, scan_site
from fedseg.data.nifti_guard import VolumeError, load_nifti, max_voxels_setting, unusable_voxels
from fedseg.data.splits import MIN_SUBJECTS
from fedseg.data.validation_memo import ValidationMemo
from fedseg.limits import MAX_CHANNELS, MAX_INTENSITY, MAX_NUM_CLASSES

DEFAULT_AFFINE_TOLERANCE = 1e-3  # mm (and direction cosines), as differences of affine entries
MAX_AFFINE_TOLERANCE = 10.0  # mm: beyond this the affine check means nothing
MAX_LABEL_VALUE = MAX_NUM_CLASSES - 1  # a label value trains class `value` (BraTS: 4 → 3)


class SettingError(ValueError):
    """A validation setting (`key`, as the command-line option is named) is out of range."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key, self.problem = key, problem


@dataclass
class ValidationReport:
    """The outcome of `validate_site`."""

    site_dir: str
    layout: str
    subjects: int
    num_classes: int | None
    channels: int | None  # the expected count when given, else the count most subjects have
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict:
        """JSON-able form (the `--json` output of `fedseg validate-data`)."""
        return {**asdict(self), "ok": self.ok, "errors": len(self.errors), "warnings": len(self.warnings)}

    def lines(self) -> list[str]:
        """Human-readable report: one line per problem, then a summary."""
        out = [f"{p.severity.upper():7} [{p.kind}] {p.file}: {p.fault}" for p in self.problems]
        out.append(
            f"{self.site_dir}: {self.layout} layout, {self.subjects} subjects, "
            f"{len(self.errors)} errors, {len(self.warnings)} warnings"
        )
        return out


@dataclass(frozen=True)
class _Volume:
    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray
    data: np.ndarray


def validate_site(
    site_dir: str | Path,
    num_classes: int | None = None,
    channels: int | None = None,
    affine_tolerance: float = DEFAULT_AFFINE_TOLERANCE,
    min_subjects: int = MIN_SUBJECTS,
    memo_file: Path | None = None,
    label_values: Collection[int] | None = None,
    max_voxels: int | None = None,
    allow_outside: bool | None = None,
) -> ValidationReport:
    """Check every subject of a site. Allowed label values: `label_values` (e.g. BraTS 0, 1, 2, 3, 4),
    else 0 .. num_classes − 1, else the keys of dataset.json's `labels`, else 0 .. MAX_LABEL_VALUE.
    `max_voxels`: the largest volume (voxels per channel) the site loads (fedseg.data.nifti_guard);
    `allow_outside`: files may lie outside the site folder (fedseg.data.datalist.scan_site).
    SettingError when a setting is out of range.

    With `memo_file`, subjects whose files are unchanged since the last check are not read again
    (see `fedseg.data.validation_memo`)."""
    check_settings(num_classes, channels, affine_tolerance)
    max_voxels = max_voxels_setting(max_voxels)
    memo = ValidationMemo(memo_file)
    listing = scan_site(site_dir, allow_outside)
    classes = num_classes if num_classes is not None else listing.declared_classes
    if label_values is None and num_classes is not None:
        label_values = range(num_classes)
    allowed = sorted(label_values if label_values is not None else listing.declared_values or ()) or None
    report = ValidationReport(str(listing.site_dir), listing.layout, len(listing.subjects), classes, channels)
    report.problems.extend(listing.errors)
    usable, seen_channels = 0, {}
    for subject in listing.subjects:
        key = memo.key(subject, allowed, affine_tolerance)
        found = memo.get(key)
        if found is None:
            found = _check_subject(subject, allowed, affine_tolerance, max_voxels)
            memo.put(key, *found)
        problems, n_channels = found
        report.problems.extend(problems)
        if n_channels is not None:
            seen_channels[subject.images[0]] = n_channels
        usable += not any(p.severity == "error" for p in problems)
    report.problems.extend(_check_channels(seen_channels, channels))
    if channels is None and seen_channels:
        report.channels = Counter(seen_channels.values()).most_common(1)[0][0]
    if listing.layout not in ("missing", "unknown") and usable < min_subjects:
        report.problems.append(
            Problem(
                "error",
                "too-few-subjects",
                str(listing.site_dir),
                f"{usable} usable subjects; a train / validation / test split needs at least {min_subjects}",
            )
        )
    memo.save()
    return report


def check_site(
    site_dir: str | Path,
    num_classes: int | None = None,
    channels: int | None = None,
    memo_file: Path | None = None,
    label_values: Collection[int] | None = None,
    max_voxels: int | None = None,
) -> ValidationReport:
    """Validate and raise SiteDataError (message with files, `public` with kinds only) on errors."""
    report = validate_site(
        site_dir, num_classes, channels, memo_file=memo_file, label_values=label_values, max_voxels=max_voxels
    )
    if not report.ok:
        raise SiteDataError("; ".join(map(str, report.errors)), public_summary(report.errors))
    return report


def check_settings(num_classes: int | None, channels: int | None, tolerance: float) -> None:
    """SettingError unless the class count, channel count and affine tolerance make sense."""
    if num_classes is not None and not 2 <= num_classes <= MAX_NUM_CLASSES:
        raise SettingError("num-classes", f"must be 2 (background + 1) to {MAX_NUM_CLASSES}, got {num_classes}")
    if channels is not None and not 1 <= channels <= MAX_CHANNELS:
        raise SettingError("channels", f"must be 1 to {MAX_CHANNELS}, got {channels}")
    if not (math.isfinite(tolerance) and 0 <= tolerance <= MAX_AFFINE_TOLERANCE):
        raise SettingError("tolerance", f"must be a number of mm in [0, {MAX_AFFINE_TOLERANCE:g}], got {tolerance}")


def _check_subject(
    subject: Subject, allowed: list[int] | None, tolerance: float, max_voxels: int | None = None
) -> tuple[list[Problem], int | None]:
    """Problems of one subject and its channel count (None when its images cannot be read)."""
    problems: list[Problem] = []
    images = [_read(path, problems, max_voxels) for path in subject.images]
    label = _read(subject.label, problems, max_voxels)
    channels = None
    good_images = [v for v in images if v is not None and _image_dims_ok(v, len(subject.images) > 1, problems)]
    if len(good_images) == len(images):
        channels = sum(v.shape[3] if len(v.shape) == 4 else 1 for v in good_images)
    if label is not None and len(label.shape) != 3 and not (len(label.shape) == 4 and label.shape[3] == 1):
        problems.append(_error("dimensions", label.path, f"label must be 3D, got shape {label.shape}"))
        label = None
    grid = [v for v in (*good_images, label) if v is not None]
    for other in grid[1:]:
        problems.extend(_compare_grids(grid[0], other, tolerance))
    for volume in good_images:
        problems.extend(_check_intensities(volume))
    if label is not None:
        problems.extend(_check_finite(label) or _check_label_values(label, allowed))
    return problems, channels


def _read(path: Path, problems: list[Problem], max_voxels: int | None = None) -> _Volume | None:
    """Check the header (fedseg.data.nifti_guard), then load the voxels; a fault becomes a problem."""
    try:
        header, data = load_nifti(path, max_voxels)
    except VolumeError as err:
        problems.append(_error(err.kind, path, err.fault))
        return None
    return _Volume(path, header.shape, header.affine, data)


def _image_dims_ok(volume: _Volume, multi_file: bool, problems: list[Problem]) -> bool:
    allowed = (3,) if multi_file else (3, 4)
    if len(volume.shape) in allowed:
        return True
    what = "each modality file must be 3D" if multi_file else "image must be 3D or 4D (channels last)"
    problems.append(_error("dimensions", volume.path, f"{what}, got shape {volume.shape}"))
    return False


def _compare_grids(reference: _Volume, other: _Volume, tolerance: float) -> list[Problem]:
    """Shape and affine of `other` against the subject's first image."""
    if reference.shape[:3] != other.shape[:3]:
        return [
            _error(
                "shape-mismatch",
                other.path,
                f"voxel grid {other.shape[:3]} differs from {reference.path.name} {reference.shape[:3]}",
            )
        ]
    spacing_ref = np.linalg.norm(reference.affine[:3, :3], axis=0)
    spacing = np.linalg.norm(other.affine[:3, :3], axis=0)
    if not np.allclose(spacing, spacing_ref, atol=tolerance):
        return [
            _error(
                "affine-mismatch",
                other.path,
                f"spacing {_fmt(spacing)} mm differs from {reference.path.name} {_fmt(spacing_ref)} mm",
            )
        ]
    difference = float(np.abs(other.affine - reference.affine).max())
    if difference > tolerance:
        return [
            _error(
                "affine-mismatch",
                other.path,
                f"orientation/origin differ from {reference.path.name} by up to {difference:.4g}"
                f" (tolerance {tolerance:g})",
            )
        ]
    return []


def _check_intensities(image: _Volume) -> list[Problem]:
    bad = unusable_voxels(image.data)
    message = f"{bad} NaN, infinite or out-of-range (|value| > {MAX_INTENSITY:g}) voxels"
    return [_error("non-finite", image.path, message)] if bad else []


def _check_finite(label: _Volume) -> list[Problem]:
    if not np.issubdtype(label.data.dtype, np.floating):
        return []
    bad = int(np.count_nonzero(~np.isfinite(label.data)))
    return [_error("non-finite", label.path, f"{bad} NaN or infinite voxels")] if bad else []


def _check_label_values(label: _Volume, allowed: list[int] | None) -> list[Problem]:
    values = np.unique(label.data)
    if not np.all(values == np.round(values)):
        odd = values[values != np.round(values)][:5]
        return [_error("label-values", label.path, f"non-integer label values, e.g. {_fmt(odd)}")]
    odd = values[(values < 0) | (values > MAX_LABEL_VALUE)]
    if allowed is None and odd.size:
        return [
            _error(
                "label-values",
                label.path,
                f"label values {_fmt(odd[:10])}: labels are class numbers 0 to "
                f"{MAX_LABEL_VALUE} (give the class count to check them exactly)",
            )
        ]
    if allowed is not None:
        outside = values[~np.isin(values, allowed)]
        if outside.size:
            return [
                _error(
                    "label-values",
                    label.path,
                    f"label values {_fmt(outside[:10])} outside the declared classes {_ranges(allowed)}",
                )
            ]
    if not np.any(values != 0):
        return [Problem("warning", "empty-label", str(label.path), "label has no foreground voxels")]
    return []


def _check_channels(seen: dict[Path, int], expected: int | None) -> list[Problem]:
    if expected is not None:
        return [
            _error("channels", path, f"{n} image channels, the run expects {expected}")
            for path, n in seen.items()
            if n != expected
        ]
    counts = sorted(set(seen.values()))
    if len(counts) <= 1:
        return []
    usual = max(counts, key=list(seen.values()).count)
    return [
        _error("channels", path, f"{n} image channels, most subjects have {usual}")
        for path, n in seen.items()
        if n != usual
    ]


def _ranges(values: list[int]) -> str:
    """0..3 for a contiguous list, else the values: 0, 1, 2, 4."""
    if values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return ", ".join(map(str, values))


def _error(kind: str, path: Path, fault: str) -> Problem:
    return Problem("error", kind, str(path), fault)


def _fmt(values: np.ndarray) -> str:
    return ", ".join(f"{v:g}" for v in np.asarray(values, dtype=float).ravel())
