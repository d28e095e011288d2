"""MONAI dictionary pipelines: a deterministic part (cacheable) and a random training part.

The deterministic part follows the prostate study: load (several modality files, or the channels
of a 4D NIfTI, become image channels), map stored label values to training ones where the label
scheme says so (BraTS enhancing tumour 4 → 3, fedseg.labels), reorient to RAS, resample to `pixdim`
mm (1 mm isotropic in the study; None keeps the stored grid), z-score the image on nonzero voxels
per channel.
Training adds, still deterministic, padding to at least one patch and the label's foreground and
background voxel indices, so the random crops of every epoch do not rescan the whole volume.

The random part (`augmentation`) is chosen by preset name (`AUGMENTATIONS`, run-config key
`augmentation`): "standard" (crops, flips, small affine, intensity scale/shift), "shift" (for
institutions no site resembles: also bias field, gamma, histogram shift, noise, blur/sharpen,
thick slices, larger rotations and scalings, optional contrast inversion, random tissue contrast
and repainted labelled structures) or "none" (crops only).
It runs on patches of the z-scored image, after the cached deterministic part.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.networks.layers import GaussianFilter
from monai.transforms import (
    Compose,
    EnsureTyped,
    FgBgToIndicesd,
    LoadImaged,
    MapLabelValued,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSharpend,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    Randomizable,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import MAX_SEED
from monai.utils.type_conversion import convert_to_dst_type

from fedseg.intensity import IntensityWindow, intensity_transform

KEYS = ("image", "label")
STUDY_PIXDIM = (1.0, 1.0, 1.0)
FG_INDICES, BG_INDICES = "label_fg_indices", "label_bg_indices"  # FgBgToIndicesd's default output keys
AUGMENTATIONS: tuple[str, ...] = ("standard", "shift", "none")  # run-config 'augmentation'

# The "shift" preset: what differs between institutions, drawn per patch and per image channel
# (modalities are separate acquisitions). Ranges cover the synthetic sites' differences and go
# somewhat beyond them, since an unseen institution is by definition not one of them; each effect
# has a probability well below 1 so that most patches still look like the site's own scans.
SHIFT_ROTATION_DEG = 20.0  # "standard": 10°; positioning and stored-axis tilt vary more across sites
SHIFT_SCALE = 0.2  # "standard": 0.1; habitus and voxel-size calibration
SHIFT_AFFINE_PROB = 0.4  # "standard": 0.3
SHIFT_THICK_SLICES_PROB = 0.25
SHIFT_SLICE_FACTOR = (1.5, 3.5)  # slice thickness ÷ grid spacing: the sites have 1, 1.6 and 2.4 mm, outside 3 mm
SHIFT_BIAS_PROB = 0.3
SHIFT_BIAS_DEGREE = 2  # smooth over a patch, as a receive coil's field is over a body region
SHIFT_BIAS_COEFF = (-0.1, 0.1)  # a patch's max/min gain about 1.6 (median), at most about 2.2
SHIFT_GAMMA_PROB = 0.3
SHIFT_GAMMA = (0.7, 1.5)  # nnU-Net's range; the patch's mean and std are kept (still z-scored)
SHIFT_HISTOGRAM_PROB = 0.2
SHIFT_HISTOGRAM_POINTS = (5, 10)  # monotone piecewise-linear remap: tissue contrasts of another protocol
SHIFT_INTENSITY_PROB = 0.5
SHIFT_INTENSITY = 0.2  # ± scale factor and ± shift in z units ("standard": 0.1): residual normalisation error
SHIFT_SMOOTH_PROB = 0.15
SHIFT_SMOOTH_SIGMA = (0.5, 1.0)  # voxels: a softer reconstruction kernel, in-plane partial volume
SHIFT_SHARPEN_PROB = 0.1
SHIFT_SHARPEN_ALPHA = (2.0, 8.0)  # MONAI's default (10, 30) is far beyond any scanner's edge enhancement
SHIFT_NOISE_PROB = 0.2
REMAP_POINTS = (4, 8)  # control points of a random tissue-contrast curve over a patch's intensity range
STRUCTURE_LEVELS = (0.02, 0.98)  # a labelled structure's new mean: uniform between these quantiles of the patch
STRUCTURE_GAIN = (0.5, 1.5)  # its texture about that mean, scaled
STRUCTURE_EDGE_SIGMA = 0.5  # voxels: a repainted structure's new level blends into its surroundings (partial volume)
SHIFT_NOISE_STD = 0.15  # z units, drawn in [0, this], added to the noise a site has (synthetic: 0.09 to 0.31)


def preprocessing(
    pixdim: Sequence[float] | None = None,
    label_mapping: Mapping[int, int] | None = None,
    window: IntensityWindow | None = None,
) -> Compose:
    """Load channel-first, map label values (`label_mapping`, stored → trained), RAS, optional
    resampling to `pixdim` mm, z-score on nonzero voxels or the intensity `window` (fedseg.intensity)."""
    steps: list[MapTransform] = [LoadImaged(keys=KEYS, image_only=True, ensure_channel_first=True)]
    if label_mapping:
        stored, trained = zip(*sorted(label_mapping.items()), strict=True)
        steps.append(MapLabelValued(keys="label", orig_labels=list(stored), target_labels=list(trained)))
    steps.append(Orientationd(keys=KEYS, axcodes="RAS", labels=None))
    if pixdim is not None:
        steps.append(Spacingd(keys=KEYS, pixdim=tuple(pixdim), mode=("bilinear", "nearest")))
    steps += [
        intensity_transform(window),
        EnsureTyped(keys=KEYS, track_meta=False),
    ]
    return Compose(steps)


def training_preprocessing(
    patch_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
    label_mapping: Mapping[int, int] | None = None,
    window: IntensityWindow | None = None,
) -> Compose:
    """`preprocessing`, padding to at least `patch_size`, then the label's foreground/background voxel indices."""
    return Compose(
        [
            *preprocessing(pixdim, label_mapping, window).transforms,
            SpatialPadd(keys=KEYS, spatial_size=tuple(patch_size)),
            FgBgToIndicesd(keys="label"),
            # plain tensors as `preprocessing` gives; int32 indices take half the memory of int64
            EnsureTyped(
                keys=(*KEYS, FG_INDICES, BG_INDICES), dtype=(None, None, torch.int32, torch.int32), track_meta=False
            ),
        ]
    )


def augmentation(
    patch_size: Sequence[int],
    samples_per_volume: int = 2,
    max_rotation_deg: float = 10.0,
    max_scale: float = 0.1,
    *,
    preset: str = "standard",
    invert_probability: float = 0.0,
    remap_probability: float = 0.0,
    structure_probability: float = 0.0,
) -> Compose:
    """The random training part of preset `preset` (one of `AUGMENTATIONS`), on `training_preprocessing`'s output.

    Every preset starts with positive/negative patch crops from the cached indices. "standard" adds
    flips, rotations up to `max_rotation_deg` and scalings up to `max_scale` (p 0.3), intensity
    scale/shift (the pipeline of the prostate study, unchanged). "shift" adds to flips and larger
    affines (`SHIFT_*`), per image channel: simulated thick slices, bias field, gamma, histogram
    shift, intensity scale/shift, blur or sharpening, Gaussian noise; then, with
    `invert_probability` > 0, negates the whole z-scored image (contrast inversion, e.g. T1 vs T2)
    with that probability, and with `remap_probability` > 0 gives a patch a random tissue contrast
    (RandTissueContrastd); `structure_probability` > 0 first repaints the labelled structures
    against their surroundings (RandStructureContrastd, before the scanner effects blur and bias
    them). "none" crops only.
    """
    if preset not in AUGMENTATIONS:
        raise ValueError(f"augmentation preset '{preset}': choose one of {', '.join(AUGMENTATIONS)}")
    for name, value in (
        ("invert_probability", invert_probability),
        ("remap_probability", remap_probability),
        ("structure_probability", structure_probability),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    crop = RandCropByPosNegLabeld(
        keys=KEYS,
        label_key="label",
        spatial_size=tuple(patch_size),
        pos=1,
        neg=1,
        num_samples=samples_per_volume,
        fg_indices_key=FG_INDICES,
        bg_indices_key=BG_INDICES,
    )
    if preset == "none":
        return Compose([crop])
    if preset == "standard":
        return Compose(
            [
                crop,
                *_flips(),
                _affine(max_rotation_deg, max_scale, 0.3),
                RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
                RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            ]
        )
    steps: list[MapTransform] = [
        crop,
        *_flips(),
        _affine(SHIFT_ROTATION_DEG, SHIFT_SCALE, SHIFT_AFFINE_PROB),
    ]
    if structure_probability > 0:  # 0: no step at all
        steps.append(RandStructureContrastd("image", label_key="label", prob=structure_probability))
    steps.append(ChannelWised("image", Compose(_scanner_effects("image"))))
    if remap_probability > 0:  # 0: no step at all
        steps.append(RandTissueContrastd("image", prob=remap_probability))
    if invert_probability > 0:
        steps.append(RandNegated("image", prob=invert_probability))
    return Compose(steps)


def _flips() -> list[RandFlipd]:
    return [RandFlipd(keys=KEYS, prob=0.5, spatial_axis=axis) for axis in range(3)]


def _affine(max_rotation_deg: float, max_scale: float, prob: float) -> RandAffined:
    angle = math.radians(max_rotation_deg)
    return RandAffined(
        keys=KEYS,
        prob=prob,
        rotate_range=(angle, angle, angle),
        scale_range=(max_scale, max_scale, max_scale),
        mode=("bilinear", "nearest"),
        padding_mode="border",
    )


def _scanner_effects(key: str) -> list:
    """The "shift" preset's acquisition differences, on one z-scored image channel (labels untouched)."""
    return [
        RandThickSlicesd(key, prob=SHIFT_THICK_SLICES_PROB, factor_range=SHIFT_SLICE_FACTOR),
        RandBiasFieldd(key, degree=SHIFT_BIAS_DEGREE, coeff_range=SHIFT_BIAS_COEFF, prob=SHIFT_BIAS_PROB),
        RandAdjustContrastd(key, prob=SHIFT_GAMMA_PROB, gamma=SHIFT_GAMMA, retain_stats=True),
        RandHistogramShiftd(key, num_control_points=SHIFT_HISTOGRAM_POINTS, prob=SHIFT_HISTOGRAM_PROB),
        RandScaleIntensityd(key, factors=SHIFT_INTENSITY, prob=SHIFT_INTENSITY_PROB),
        RandShiftIntensityd(key, offsets=SHIFT_INTENSITY, prob=SHIFT_INTENSITY_PROB),
        RandGaussianSmoothd(
            key,
            sigma_x=SHIFT_SMOOTH_SIGMA,
            sigma_y=SHIFT_SMOOTH_SIGMA,
            sigma_z=SHIFT_SMOOTH_SIGMA,
            prob=SHIFT_SMOOTH_PROB,
        ),
        RandGaussianSharpend(key, alpha=SHIFT_SHARPEN_ALPHA, prob=SHIFT_SHARPEN_PROB),
        RandGaussianNoised(key, prob=SHIFT_NOISE_PROB, std=SHIFT_NOISE_STD),  # last: noise is not blurred
    ]


class ChannelWised(Randomizable, MapTransform):
    """Applies `transform` (a dictionary transform of `keys`) to every channel of `keys` on its own,
    so that each channel (modality) gets its own random draws; one channel: `transform` itself."""

    def __init__(self, keys: KeysCollection, transform: Compose) -> None:
        MapTransform.__init__(self, keys)
        self.transform = transform

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> ChannelWised:
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed=int(self.R.randint(MAX_SEED, dtype="uint32")))
        return self

    def randomize(self, data: object = None) -> None:  # the inner transforms draw their own
        pass

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            channels = [self.transform({key: image[c : c + 1]})[key] for c in range(image.shape[0])]
            d[key] = convert_to_dst_type(torch.cat([torch.as_tensor(c) for c in channels]), image)[0]
        return d


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """Thick slices resampled to the training grid: along one random axis, averages about `factor`
    neighbouring slices (`factor` drawn from `factor_range`) and interpolates linearly back."""

    def __init__(self, keys: KeysCollection, prob: float, factor_range: tuple[float, float]) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.factor_range = factor_range
        self.axis, self.factor = 2, 1.0

    def randomize(self, data: object = None) -> None:
        super().randomize(None)
        if self._do_transform:
            self.axis = int(self.R.randint(3))
            self.factor = float(self.R.uniform(*self.factor_range))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            shape = list(image.shape[1:])
            thick = list(shape)
            thick[self.axis] = max(1, round(shape[self.axis] / self.factor))
            low = F.interpolate(image[None].float(), size=thick, mode="area")
            d[key] = convert_to_dst_type(F.interpolate(low, size=shape, mode="trilinear")[0], d[key])[0]
        return d


class RandImaged(RandomizableTransform, MapTransform):
    """With probability `prob` (one draw per call), replaces each of `keys` by `apply(value)`."""

    def __init__(self, keys: KeysCollection, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = self.apply(d[key])
        return d


class RandNegated(RandImaged):
    """Negates `keys` with probability `prob`: on a z-scored image, an inverted contrast (bright ↔ dark)."""

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        return -value


class RandTissueContrastd(RandImaged):
    """With probability `prob`, gives each channel of `keys` a random tissue contrast: its intensities
    pass through a random, generally non-monotone, piecewise-linear curve (REMAP_POINTS control points
    over the patch's 0.5–99.5 % intensity range, values uniform in [-1, 1]) and are z-scored again.

    Shapes stay, contrasts do not: an unseen protocol can darken a tissue that every site shows
    bright (fat suppression) or invert one boundary but not another, which no monotone remap or
    global inversion produces. Training on random contrasts (as SynthSeg does with whole synthetic
    images, Billot et al. 2023) pushes the network towards shape cues.
    """

    def apply(self, value: torch.Tensor) -> torch.Tensor:
        out = torch.stack([self._remap(channel) for channel in torch.as_tensor(value).float()])
        return convert_to_dst_type(out, value)[0]

    def _remap(self, channel: torch.Tensor) -> torch.Tensor:
        points = int(self.R.randint(REMAP_POINTS[0], REMAP_POINTS[1] + 1))
        values = torch.as_tensor(self.R.uniform(-1.0, 1.0, points), dtype=torch.float32)
        low, high = torch.quantile(channel.flatten(), torch.tensor([0.005, 0.995]))
        position = (channel.clamp(low, high) - low) / (high - low).clamp_min(1e-6) * (points - 1)
        left = position.floor().clamp(max=points - 2).long()
        weight = position - left
        curve = values[left] * (1 - weight) + values[left + 1] * weight
        return (curve - curve.mean()) / curve.std().clamp_min(1e-6)


class RandStructureContrastd(RandomizableTransform, MapTransform):
    """With probability `prob`, gives each labelled structure of a patch its own contrast against its
    surroundings: inside label value v, each image channel's intensities move to a random mean level
    (uniform between the channel's STRUCTURE_LEVELS quantiles over the patch) with their texture about
    the structure's mean scaled by a random gain (STRUCTURE_GAIN). The shift of the mean is smoothed
    over STRUCTURE_EDGE_SIGMA voxels, so a structure blends into its surroundings as through partial
    volume (a wider blur would carry the old contrast into thin structures), normalised so that a
    structure cut by the patch border keeps its level up to the border. Labels are untouched.

    What a protocol changes most is how bright an organ is against what surrounds it (fat suppression
    darkens the fat around the prostate; T1 vs T2 swaps zones), and no curve over intensities changes
    that when organ and neighbour are about equally bright. SynthSeg (Billot et al. 2023) draws each
    labelled tissue's intensity at random for that reason; here the labelled structures of a real
    image are redrawn and their unlabelled surroundings kept, so the network has to find them by shape.
    """

    def __init__(self, keys: KeysCollection, label_key: str, prob: float) -> None:
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.label_key = label_key
        self._smooth = GaussianFilter(spatial_dims=3, sigma=STRUCTURE_EDGE_SIGMA)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        label = torch.as_tensor(d[self.label_key])[0]
        structures = [label == v for v in torch.unique(label).tolist() if v != 0]
        if not structures:
            return d
        with torch.no_grad():  # the filter pads with zeros: dividing by the blurred ones keeps levels at the border
            weight = self._smooth(torch.ones_like(label, dtype=torch.float32)[None, None])[0, 0]
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key]).float()
            repainted = [self._repaint(c, structures, weight) for c in image]
            d[key] = convert_to_dst_type(torch.stack(repainted), d[key])[0]
        return d

    def _repaint(self, channel: torch.Tensor, structures: list[torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
        low, high = torch.quantile(channel.flatten(), torch.tensor(STRUCTURE_LEVELS))
        out, shift = channel.clone(), torch.zeros_like(channel)
        for inside in structures:
            mean = channel[inside].mean()
            level = low + (high - low) * float(self.R.uniform())
            out[inside] = mean + (channel[inside] - mean) * float(self.R.uniform(*STRUCTURE_GAIN))
            shift[inside] = level - mean
        with torch.no_grad():
            return out + self._smooth(shift[None, None])[0, 0] / weight
