"""run-config `intensity`: how image intensities are normalised before the network, the same in
training, evaluation and `fedseg predict` (the model file records it).

- "z-score" (default): per channel over the non-zero voxels (MONAI `NormalizeIntensityd`), for MR
  and mixed data;
- "window:A,B" or "window:A,B,C,D": clip to [A, B] and map linearly onto [C, D] (default [0, 1]),
  MONAI `ScaleIntensityRanged`, for CT (e.g. "window:-57,164", abdominal soft tissue);
- "bundle" (with model = "bundle"): the bundle's own `ScaleIntensityRanged` window (z-score when the
  bundle has none).
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import Any

from monai.transforms import MapTransform, NormalizeIntensityd, ScaleIntensityRanged

ZSCORE = "z-score"
BUNDLE = "bundle"
WINDOW_PREFIX = "window:"


class IntensityError(ValueError):
    """An `intensity` value that names no normalisation."""


@dataclass(frozen=True)
class IntensityWindow:
    """ScaleIntensityRanged's settings: [a_min, a_max] → [b_min, b_max], clipped or not."""

    a_min: float
    a_max: float
    b_min: float = 0.0
    b_max: float = 1.0
    clip: bool = True

    def __post_init__(self) -> None:
        bounds = (self.a_min, self.a_max, self.b_min, self.b_max)
        # an infinite or NaN bound or span maps every voxel to one value (or NaN): a blank image, no error
        if not all(map(math.isfinite, (*bounds, self.a_max - self.a_min, self.b_max - self.b_min))):
            raise IntensityError(f"a window needs finite bounds with a finite span, got {', '.join(map(str, bounds))}")
        if not self.a_min < self.a_max:
            raise IntensityError(f"a window needs its lower bound below its upper one, got {self.a_min}, {self.a_max}")
        if self.b_min == self.b_max:
            raise IntensityError(f"a window needs two target values, got {self.b_min} twice (a blank image)")

    def to_list(self) -> list[Any]:
        """Plain values for model files and cache keys."""
        return list(astuple(self))

    @classmethod
    def from_list(cls, values: Any) -> IntensityWindow:
        if (
            not isinstance(values, (list, tuple))
            or len(values) != 5
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values[:4])
            or not isinstance(values[4], bool)
        ):
            raise IntensityError(f"an intensity window is [a_min, a_max, b_min, b_max, clip], got {values!r}")
        if not all(map(is_finite, values[:4])):
            raise IntensityError(f"a window needs finite bounds, got {values!r}")
        a_min, a_max, b_min, b_max = (float(v) for v in values[:4])
        return cls(a_min, a_max, b_min, b_max, clip=values[4])

    def __str__(self) -> str:
        clipped = "clipped" if self.clip else "not clipped"
        return f"window [{self.a_min:g}, {self.a_max:g}] → [{self.b_min:g}, {self.b_max:g}], {clipped}"


def is_finite(value: float) -> bool:
    """Whether a number is finite as a float (an int too large for one is not; math.isfinite raises)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def parse_intensity(text: str) -> IntensityWindow | None:
    """The window of "window:A,B[,C,D]", None for "z-score"; IntensityError otherwise ("bundle" is
    resolved against the bundle, see fedseg.model_spec.intensity_window)."""
    if text == ZSCORE:
        return None
    if text.startswith(WINDOW_PREFIX):
        parts = text.removeprefix(WINDOW_PREFIX).split(",")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) in (2, 4) and all(abs(n) < float("inf") for n in numbers):
            a_min, a_max, *target = numbers
            b_min, b_max = target or (0.0, 1.0)
            return IntensityWindow(a_min, a_max, b_min, b_max)
    raise IntensityError(
        f'{text!r}: give "{ZSCORE}", "{WINDOW_PREFIX}A,B" (clip to [A, B], map onto [0, 1]), '
        f'"{WINDOW_PREFIX}A,B,C,D" (onto [C, D]) or "{BUNDLE}"'
    )


def describe(window: IntensityWindow | None) -> str:
    """What a model file says about the intensity step."""
    return "z-score per channel over the non-zero voxels" if window is None else f"{window} (ScaleIntensityRanged)"


def intensity_transform(window: IntensityWindow | None, keys: str = "image") -> MapTransform:
    """The MONAI step for `window`: z-score per channel over the non-zero voxels, or the window."""
    if window is None:
        return NormalizeIntensityd(keys=keys, nonzero=True, channel_wise=True)
    return ScaleIntensityRanged(
        keys=keys, a_min=window.a_min, a_max=window.a_max, b_min=window.b_min, b_max=window.b_max, clip=window.clip
    )
