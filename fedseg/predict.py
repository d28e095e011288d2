"""`fedseg predict`: segment NIfTI volumes with one model or an ensemble, in the input's own space.

Each model preprocesses the image as in training (RAS, its `pixdim`, z-score), runs sliding-window
inference, and its class probabilities are mapped back to the input's grid with MONAI's
`Invertd` (undoing resampling and reorientation). Several models: probabilities are averaged
(the prostate study's fold ensemble). The label map is written with the input's affine and header.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd, LoadImaged, NormalizeIntensityd, Orientationd, Spacingd

from fedseg.data.datalist import NIFTI_SUFFIXES
from fedseg.model_checkpoint import ModelCheckpoint


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


def probabilities(model: ModelCheckpoint, image_path: Path, device: str | torch.device | None = None) -> torch.Tensor:
    """Class probabilities (classes, *input shape) of one model, on the input's voxel grid."""
    pipeline = inference_pipeline(model.pixdim)
    data = pipeline({"image": str(image_path)})
    image = data["image"]
    if image.shape[0] != model.in_channels:
        raise PredictError(f"{image_path}: has {image.shape[0]} channel(s), the model takes {model.in_channels}")
    logits = model.trainer(device).predict_logits(image[None])[0].cpu()
    data["pred"] = MetaTensor(torch.softmax(logits, dim=0), meta=image.meta, applied_operations=image.applied_operations)
    inverse = Invertd(keys="pred", transform=pipeline, orig_keys="image", nearest_interp=False)
    return torch.as_tensor(inverse(data)["pred"])


def predict_volume(models: Sequence[ModelCheckpoint], image_path: Path) -> nib.Nifti1Image:
    """Label map of the mean probability of `models`, with the input's shape, affine and header."""
    if len({m.num_classes for m in models}) != 1:
        raise PredictError("the models of an ensemble must have the same num-classes")
    mean = torch.stack([probabilities(m, image_path) for m in models]).mean(dim=0)
    source = nib.load(str(image_path))
    labels = mean.argmax(dim=0).numpy().astype(np.uint8)
    if labels.shape != source.shape[:3]:
        raise PredictError(f"{image_path}: inverted prediction has shape {labels.shape}, input {source.shape[:3]}")
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    return nib.Nifti1Image(labels, source.affine, header)


def predict(model_paths: Sequence[str | Path], input_path: str | Path, output_path: str | Path) -> list[Path]:
    """Segment one NIfTI file, or every NIfTI file of a folder into an output folder; return outputs."""
    if not model_paths:
        raise PredictError("give at least one --model checkpoint")
    models = [ModelCheckpoint.load(path) for path in model_paths]
    source, target = Path(input_path), Path(output_path)
    if source.is_dir():
        pairs = [(path, target / path.name) for path in sorted(source.iterdir()) if path.name.endswith(NIFTI_SUFFIXES)]
        if not pairs:
            raise PredictError(f"{source}: no .nii or .nii.gz files in this folder")
    elif source.is_file():
        pairs = [(source, target)]
    else:
        raise PredictError(f"{source}: input not found")
    for image_path, out_path in pairs:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(predict_volume(models, image_path), str(out_path))
    return [out for _, out in pairs]
