"""`fedseg predict`: segment NIfTI volumes with one model or an ensemble, in the input's own space.

A case is one file (3D, or 4D with the modalities on the last axis) or several 3D files, one per
modality, in the order the model was trained on (e.g. T1, T1-Gd, T2, FLAIR). Each model
preprocesses the image as in training (RAS, its `pixdim`, z-score per channel), runs sliding-window
inference, and its probabilities (softmax per class, or sigmoid per BraTS region) are mapped back
to the input's grid with MONAI's `Invertd` (undoing resampling and reorientation). Several models:
probabilities are averaged (the prostate study's fold ensemble). The label map is written with the
first input's affine and header, in the data's own label values (BraTS: enhancing tumour as 4).

Nothing is read before every input's header passed fedseg.data.nifti_guard (NIfTI, 3D/4D, real
voxels, a size the file can hold and the site's voxel limit allows, also on the model's grid), and
nothing is written unless every case succeeds: outputs go to temporary files renamed at the end. An
input with a NaN or infinite voxel is refused (a model would turn it into an all-background map).
A model whose patch would not fit in memory is refused before any case is read (fedseg.network_check's
estimate); where a few windows fit, the sliding window takes that many per forward pass instead of four.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, Orientationd, Spacingd

from fedseg.data.datalist import NIFTI_SUFFIXES, subject_id_of
from fedseg.data.nifti_guard import NiftiHeader, inspect_nifti, nifti_image, unusable_voxels
from fedseg.enhancing import smallest_threshold
from fedseg.errors import first_line
from fedseg.intensity import IntensityWindow, intensity_transform
from fedseg.labels import BRATS_ENHANCING, BRATS_STORED_ENHANCING, LabelScheme
from fedseg.limits import MAX_INTENSITY
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.network_check import CPU_CHECK_SHARE, cpu_check_budget, inference_patch_bytes
from fedseg.personal_mix import ensemble_mean
from fedseg.progress import track
from fedseg.trainer import SW_BATCH_SIZE, SegmentationTrainer

Case = tuple[Path, ...]  # one case: a 3D/4D file, or one 3D file per modality


class PredictError(ValueError):
    """Inputs, outputs or models of a prediction do not fit together."""


def inference_pipeline(pixdim: Sequence[float] | None, window: IntensityWindow | None = None) -> Compose:
    """The training preprocessing (fedseg.data.transforms.preprocessing) for the image alone, meta kept."""
    steps = [
        LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
        Orientationd(keys="image", axcodes="RAS", labels=None),
    ]
    if pixdim is not None:
        steps.append(Spacingd(keys="image", pixdim=tuple(pixdim), mode="bilinear"))
    steps.append(intensity_transform(window))  # z-score, or the model's intensity window (fedseg.intensity)
    return Compose(steps)


def probabilities(
    model: ModelCheckpoint,
    case: Case | Path,
    device: str | torch.device | None = None,
    trainer: SegmentationTrainer | None = None,
) -> torch.Tensor:
    """Probabilities (model outputs, *input shape) of one model, on the input's voxel grid."""
    case = _as_case(case)
    pipeline = inference_pipeline(model.pixdim, model.intensity)
    load, rest = pipeline.transforms[0], Compose(pipeline.transforms[1:])
    data = load({"image": str(case[0]) if len(case) == 1 else [str(path) for path in case]})
    image = data["image"]
    bad = unusable_voxels(torch.as_tensor(image).numpy())
    if bad:
        raise PredictError(
            f"{case[0]}: {bad} NaN, infinite or out-of-range (|value| > {MAX_INTENSITY:g}) voxel(s); fix or mask "
            "them (the model would return background there and around them)"
        )
    data = rest(data)
    image = data["image"]
    if image.shape[0] != model.in_channels:
        raise PredictError(
            f"{case[0]}: the case has {image.shape[0]} channel(s), the model takes "
            f"{model.in_channels} (give one file per modality, in the model's order)"
        )
    logits = (trainer or model.trainer(device)).predict_logits(image[None]).cpu()
    scores = model.labels.probabilities(logits)[0]
    data["pred"] = MetaTensor(scores, meta=image.meta, applied_operations=image.applied_operations)
    inverse = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=False)
    return torch.as_tensor(inverse(data)["pred"])


def on_input_grid(scheme: LabelScheme, pixdim: Sequence[float] | None, source: nib.Nifti1Image) -> LabelScheme:
    """The enhancing-tumour threshold counts voxels of the model's grid (pixdim); the label map here is on
    the input's grid, so the count is scaled by the ratio of the voxel volumes."""
    zooms = [float(z) for z in source.header.get_zooms()[:3]]
    if not scheme.enhancing_min_voxels or pixdim is None or not all(0 < z < math.inf for z in zooms):
        return scheme
    ratio = math.prod(pixdim) / math.prod(zooms)
    return dataclasses.replace(scheme, enhancing_min_voxels=max(1, round(scheme.enhancing_min_voxels * ratio)))


def predict_volume(
    models: Sequence[ModelCheckpoint], case: Case | Path, trainers: Sequence[SegmentationTrainer] | None = None
) -> nib.Nifti1Image:
    """Label map of the mean probability of `models` (a personal model weighted as exported,
    fedseg.personal_mix), with the (first) input's shape, affine and header."""
    case = _as_case(case)
    _check_ensemble(models)
    reused: Sequence[SegmentationTrainer | None] = trainers or [None] * len(models)
    mean = ensemble_mean(
        [probabilities(m, case, trainer=t)[None] for m, t in zip(models, reused, strict=True)],
        [m.ensemble_weight for m in models],
    )[0]
    source = nifti_image(case[0])
    labels_scheme = on_input_grid(smallest_threshold([m.labels for m in models]), models[0].pixdim, source)
    labels = labels_scheme.label_map(mean[None])[0, 0].numpy().astype(np.uint8)
    if labels_scheme.kind == "brats":
        labels[labels == BRATS_ENHANCING] = BRATS_STORED_ENHANCING
    if labels.shape != source.shape[:3]:
        raise PredictError(f"{case[0]}: inverted prediction has shape {labels.shape}, input {source.shape[:3]}")
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    if len(source.shape) > 3:  # a 4D input: the label map is 3D
        header.set_data_shape(source.shape[:3])
    return nib.Nifti1Image(labels, source.affine, header)


def predict(
    model_paths: Sequence[str | Path],
    inputs: str | Path | Sequence[str | Path],
    output_path: str | Path,
    max_voxels: int | None = None,
) -> list[Path]:
    """Segment one case (one file, or one file per modality), or every case of a folder into an
    output folder; return the outputs. In a folder, files `<id>_0000.nii.gz`, `<id>_0001.nii.gz`, …
    are the modalities of case `<id>` (written as `<id>.nii.gz`); other files are one case each.
    `max_voxels`: the largest volume accepted (voxels per channel, also on each model's grid;
    fedseg.data.nifti_guard). All outputs are written, or none (PredictError naming the file)."""
    if not model_paths:
        raise PredictError("give at least one --model checkpoint")
    models = [ModelCheckpoint.load(path) for path in model_paths]
    _check_ensemble(models)
    sources = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    target = Path(output_path)
    if len(sources) == 1 and sources[0].is_dir():
        pairs = folder_cases(sources[0], target)
    else:
        for source in sources:
            if not source.is_file():
                raise PredictError(
                    f"{source}: input not found" + (" (a folder must be the only input)" if source.is_dir() else "")
                )
        pairs = [(tuple(sources), target)]
    for case, out_path in pairs:
        _check_case(case, models, max_voxels)
        _check_output(out_path, case)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    trainers = [
        model.trainer(device, sw_batch_size=_windows_at_once(Path(path), model, device))
        for path, model in zip(model_paths, models, strict=True)
    ]
    written: list[tuple[Path, Path]] = []  # (temporary file, output)
    created = _missing_folders({out.parent for _, out in pairs})
    done = False
    try:
        for case, out_path in track(pairs, "segmenting"):
            try:
                image = predict_volume(models, case, trainers)
            except PredictError:
                raise
            except (RuntimeError, ValueError, OSError, IndexError, TypeError, EOFError, zlib.error) as err:
                # failures inside MONAI/torch, or a compressed file that ends early or does not inflate
                raise PredictError(f"{case[0]}: cannot segment: {type(err).__name__}: {first_line(err)}") from None
            written.append((_write_temporary(image, out_path), out_path))
        for tmp, out_path in written:
            os.replace(tmp, out_path)
        done = True
    finally:
        for tmp, _ in written:
            tmp.unlink(missing_ok=True)
        if not done:
            for folder in sorted(created, key=lambda p: len(p.parts), reverse=True):
                _remove_if_empty(folder)
    return [out for _, out in pairs]


def _check_ensemble(models: Sequence[ModelCheckpoint]) -> None:
    if len({(m.labels.kind, m.labels.out_channels, m.num_classes) for m in models}) != 1:
        raise PredictError("the models of an ensemble must have the same num-classes and label scheme")
    if sum(m.ensemble_weight is not None for m in models) > 1:
        raise PredictError("an ensemble can hold one site's personal model (`fedseg site personal-model`), not several")


def _windows_at_once(path: Path, model: ModelCheckpoint, device: torch.device) -> int:
    """Sliding windows per forward pass that fit this machine's memory (at most `SW_BATCH_SIZE`; one for a
    network whose memory cannot be estimated); PredictError naming the model file when not even one does
    (a hostile model file's patch size, or a workstation's on a laptop)."""
    need = inference_patch_bytes(
        model.model, model.model_args, model.in_channels, model.labels.out_channels, model.patch_size
    )
    if need is None:
        return 1
    if device.type == "cuda":
        budget, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        budget, where = cpu_check_budget(), f"{CPU_CHECK_SHARE:.0%} of this machine's memory"
    if need > budget:
        patch = "x".join(map(str, model.patch_size))
        raise PredictError(
            f"{path}: segmenting one {patch} patch with model '{model.model}' would need about "
            f"{need / 2**30:.1f} GiB (estimated), more than the {budget / 2**30:.1f} GiB fedseg may use ({where})"
        )
    return int(min(SW_BATCH_SIZE, budget // need))


def _check_case(case: Case, models: Sequence[ModelCheckpoint], max_voxels: int | None) -> list[NiftiHeader]:
    """Every file's header (fedseg.data.nifti_guard, on each model's grid), modality files 3D on one grid,
    and the channel count the models take; VolumeError or PredictError naming the file."""
    headers = [inspect_nifti(path, max_voxels) for path in case]
    for model in models:
        if model.pixdim is not None:
            for path in case:
                inspect_nifti(path, max_voxels, model.pixdim)
    if len(case) > 1:
        for header in headers:
            if len(header.shape) != 3:
                raise PredictError(f"{header.path}: each modality file must be 3D, got shape {header.shape}")
            if header.shape != headers[0].shape:
                raise PredictError(
                    f"{header.path}: voxel grid {header.shape} differs from {case[0].name} {headers[0].shape}"
                )
    channels = sum(header.channels for header in headers)
    if channels != models[0].in_channels:
        raise PredictError(
            f"{case[0]}: the case has {channels} channel(s), the model takes "
            f"{models[0].in_channels} (give one file per modality, in the model's order)"
        )
    return headers


def _check_output(out_path: Path, case: Case) -> None:
    """The output must be a NIfTI file name, not an input, not a folder, in a folder we may write."""
    if not out_path.name.endswith(NIFTI_SUFFIXES):
        raise PredictError(f"{out_path}: the output must be a .nii or .nii.gz file name")
    if out_path.is_dir():
        raise PredictError(f"{out_path}: the output is a folder; give a file name (or a folder of inputs)")
    if any(out_path.resolve() == path.resolve() for path in case):
        raise PredictError(f"{out_path}: the output would overwrite its own input")
    folder = out_path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise PredictError(f"{out_path}: cannot write here ({folder} is not a folder this user may write to)")


def _missing_folders(folders: set[Path]) -> list[Path]:
    """The folders (and their missing parents) that writing into `folders` creates."""
    missing: set[Path] = set()
    for folder in folders:
        while not folder.exists() and folder != folder.parent:
            missing.add(folder)
            folder = folder.parent
    return sorted(missing)


def _write_temporary(image: nib.Nifti1Image, out_path: Path) -> Path:
    """`image` saved beside `out_path` under a temporary name (same suffix, so nibabel compresses alike)."""
    suffix = ".nii.gz" if out_path.name.endswith(".nii.gz") else ".nii"
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp{suffix}")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(image, str(tmp))
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise PredictError(f"{out_path}: cannot write: {err.strerror or err}") from None
    return tmp


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def _as_case(case: Case | Path) -> Case:
    return (case,) if isinstance(case, Path) else tuple(case)


def folder_cases(folder: Path, target: Path) -> list[tuple[Case, Path]]:
    """The cases of a folder and their output files (modality files grouped by case id)."""
    try:
        files = sorted(path for path in folder.iterdir() if path.is_file() and path.name.endswith(NIFTI_SUFFIXES))
    except OSError as err:
        raise PredictError(f"{folder}: cannot list the folder: {err.strerror or err}") from None
    if not files:
        raise PredictError(f"{folder}: no .nii or .nii.gz files in this folder")
    if target.exists() and not target.is_dir():
        raise PredictError(f"{target}: the output of a folder of cases must be a folder")
    groups: dict[str, list[Path]] = {}  # output file name → the case's files
    for path in files:
        case_id = subject_id_of(path)
        grouped = case_id != path.name.split(".nii")[0]  # named <id>_<4 digits>: a modality of case <id>
        groups.setdefault(f"{case_id}.nii.gz" if grouped else path.name, []).append(path)
    return [(tuple(paths), target / name) for name, paths in groups.items()]
