"""`fedseg predict`: segment NIfTI volumes with one model or an ensemble, in the input's own space.

A case is one file (3D, or 4D with the modalities on the last axis) or several 3D files, one per
modality, in the order the model was trained on (e.g. T1, T1-Gd, T2, FLAIR). Each model
preprocesses the image as in training (RAS, its `pixdim`, z-score per channel), runs sliding-window
inference, and its probabilities (softmax per class, or sigmoid per BraTS region) are mapped back
to the input's grid with MONAI's `Invertd` (undoing resampling and reorientation). Several models:
probabilities are averaged (the prostate study's fold ensemble). The label map is written with the
first input's affine and header, in the data's own label values (BraTS: enhancing tumour as 4).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, NormalizeIntensityd, Orientationd, Spacingd

from fedseg.data.datalist import NIFTI_SUFFIXES, subject_id_of
from fedseg.labels import BRATS_ENHANCING, BRATS_STORED_ENHANCING
from fedseg.model_checkpoint import ModelCheckpoint

Case = tuple[Path, ...]  # one case: a 3D/4D file, or one 3D file per modality


class PredictError(ValueError):
    """Inputs, outputs or models of a prediction do not fit together."""


def inference_pipeline(pixdim: Sequence[float] | None) -> Compose:
    """The training preprocessing (fedseg.data.transforms.preprocessing) for the image alone, meta kept."""
    steps = [
        LoadImaged(keys="image", image_only=True, ensure_channel_first=True),
        Orientationd(keys="image", axcodes="RAS", labels=None),
    ]
    if pixdim is not None:
        steps.append(Spacingd(keys="image", pixdim=tuple(pixdim), mode="bilinear"))
    steps.append(NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True))
    return Compose(steps)


def probabilities(model: ModelCheckpoint, case: Case | Path, device: str | torch.device | None = None) -> torch.Tensor:
    """Probabilities (model outputs, *input shape) of one model, on the input's voxel grid."""
    case = _as_case(case)
    pipeline = inference_pipeline(model.pixdim)
    data = pipeline({"image": str(case[0]) if len(case) == 1 else [str(path) for path in case]})
    image = data["image"]
    if image.shape[0] != model.in_channels:
        raise PredictError(f"{case[0]}: the case has {image.shape[0]} channel(s), the model takes "
                           f"{model.in_channels} (give one file per modality, in the model's order)")
    logits = model.trainer(device).predict_logits(image[None]).cpu()
    scores = model.labels.probabilities(logits)[0]
    data["pred"] = MetaTensor(scores, meta=image.meta, applied_operations=image.applied_operations)
    inverse = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=False)
    return torch.as_tensor(inverse(data)["pred"])


def predict_volume(models: Sequence[ModelCheckpoint], case: Case | Path) -> nib.Nifti1Image:
    """Label map of the mean probability of `models`, with the (first) input's shape, affine and header."""
    case = _as_case(case)
    if len({(m.labels.kind, m.labels.out_channels, m.num_classes) for m in models}) != 1:
        raise PredictError("the models of an ensemble must have the same num-classes and label scheme")
    labels_scheme = models[0].labels
    mean = torch.stack([probabilities(m, case) for m in models]).mean(dim=0)
    source = nib.load(str(case[0]))
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
    model_paths: Sequence[str | Path], inputs: str | Path | Sequence[str | Path], output_path: str | Path
) -> list[Path]:
    """Segment one case (one file, or one file per modality), or every case of a folder into an
    output folder; return the outputs. In a folder, files `<id>_0000.nii.gz`, `<id>_0001.nii.gz`, …
    are the modalities of case `<id>` (written as `<id>.nii.gz`); other files are one case each."""
    if not model_paths:
        raise PredictError("give at least one --model checkpoint")
    models = [ModelCheckpoint.load(path) for path in model_paths]
    sources = [Path(inputs)] if isinstance(inputs, (str, Path)) else [Path(p) for p in inputs]
    target = Path(output_path)
    if len(sources) == 1 and sources[0].is_dir():
        pairs = folder_cases(sources[0], target)
    else:
        for source in sources:
            if not source.is_file():
                raise PredictError(f"{source}: input not found" + (" (a folder must be the only input)"
                                                                   if source.is_dir() else ""))
        pairs = [(tuple(sources), target)]
    for case, out_path in pairs:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(predict_volume(models, case), str(out_path))
    return [out for _, out in pairs]


def _as_case(case: Case | Path) -> Case:
    return (case,) if isinstance(case, Path) else tuple(case)


def folder_cases(folder: Path, target: Path) -> list[tuple[Case, Path]]:
    """The cases of a folder and their output files (modality files grouped by case id)."""
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.name.endswith(NIFTI_SUFFIXES))
    if not files:
        raise PredictError(f"{folder}: no .nii or .nii.gz files in this folder")
    groups: dict[str, list[Path]] = {}  # output file name → the case's files
    for path in files:
        case_id = subject_id_of(path)
        grouped = case_id != path.name.split(".nii")[0]  # named <id>_<4 digits>: a modality of case <id>
        groups.setdefault(f"{case_id}.nii.gz" if grouped else path.name, []).append(path)
    return [(tuple(paths), target / name) for name, paths in groups.items()]
