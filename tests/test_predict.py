"""fedseg predict: output on the input's grid (shape, affine), equal to the model's segmentation."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from fedseg.data.transforms import preprocessing
from fedseg.model_checkpoint import CheckpointError, ModelCheckpoint
from fedseg.models import build_model
from fedseg.predict import PredictError, predict, probabilities

LPS_AFFINE = np.diag([-1.5, -1.5, 2.0, 1.0])  # stored in LPS: fedseg reorients to RAS before the model


def _checkpoint(tmp_path: Path, seed: int, pixdim: tuple[float, float, float] | None) -> Path:
    torch.manual_seed(seed)
    model = build_model("unet", 1, 3)
    path = tmp_path / f"model-{seed}.pt"
    ModelCheckpoint(model.state_dict(), "unet", 3, (16, 16, 16), pixdim=pixdim, description="test").save(path)
    return path


def _volume(tmp_path: Path, name: str = "case.nii.gz", shape: tuple[int, int, int] = (22, 20, 14)) -> Path:
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    image = 100.0 * (grid**2).sum(0) + 20.0 * grid[0] + rng.normal(0, 5, shape)
    path = tmp_path / name
    nib.save(nib.Nifti1Image(image.astype(np.float32), LPS_AFFINE), str(path))
    return path


def _model_segmentation(checkpoint: Path, image_path: Path, label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(the model's labels on the training grid, `label_path` resampled to that grid) via the training pipeline."""
    model = ModelCheckpoint.load(checkpoint)
    data = preprocessing(model.pixdim)({"image": str(image_path), "label": str(label_path)})
    logits = model.trainer("cpu").predict_logits(data["image"][None])
    return logits.argmax(1)[0].numpy(), data["label"][0].numpy()


def test_output_is_the_model_segmentation_on_the_input_grid(tmp_path: Path) -> None:
    checkpoint, image = _checkpoint(tmp_path, 1, pixdim=None), _volume(tmp_path)
    [out] = predict([checkpoint], image, tmp_path / "out.nii.gz")
    result, source = nib.load(str(out)), nib.load(str(image))
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    expected, same_labels = _model_segmentation(checkpoint, image, out)
    assert len(np.unique(expected)) >= 2  # the check below means something only with several classes
    np.testing.assert_array_equal(same_labels, expected)  # reorientation undone exactly


def test_resampled_model_output_is_mapped_back_to_the_input_spacing(tmp_path: Path) -> None:
    # input voxels 1.5 x 1.5 x 2 mm, model grid 3 x 3 x 2 mm: every second input voxel (x, y) is a model voxel,
    # so there the inverted prediction must be exactly the model's own label
    checkpoint, image = _checkpoint(tmp_path, 2, pixdim=(3.0, 3.0, 2.0)), _volume(tmp_path)
    [out] = predict([checkpoint], image, tmp_path / "out.nii.gz")
    result, source = nib.load(str(out)), nib.load(str(image))
    assert result.shape == source.shape and np.allclose(result.affine, source.affine)
    expected, _ = _model_segmentation(checkpoint, image, out)
    assert expected.shape[:2] == (12, 10)  # the model really ran on the coarser grid
    assert len(np.unique(expected)) >= 2
    on_model_grid = np.asarray(nib.as_closest_canonical(result).dataobj)[::2, ::2, :]
    np.testing.assert_array_equal(on_model_grid, expected[:11, :10, :])


def test_ensemble_averages_probabilities_and_folders_are_predicted(tmp_path: Path) -> None:
    checkpoints = [_checkpoint(tmp_path, seed, pixdim=None) for seed in (3, 4)]
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = [_volume(inputs, f"{name}.nii.gz", shape) for name, shape in (("a", (18, 18, 12)), ("b", (20, 16, 16)))]
    outputs = predict(checkpoints, inputs, tmp_path / "out")
    assert [p.name for p in outputs] == ["a.nii.gz", "b.nii.gz"]
    models = [ModelCheckpoint.load(c) for c in checkpoints]
    for image, out in zip(images, outputs, strict=True):
        mean = (probabilities(models[0], image) + probabilities(models[1], image)) / 2
        single = probabilities(models[0], image).argmax(0).numpy()
        ensemble = np.asarray(nib.load(str(out)).dataobj)
        np.testing.assert_array_equal(ensemble, mean.argmax(0).numpy())
        assert (ensemble != single).any()  # the second model changed some voxels


def test_a_personal_model_counts_as_much_as_its_ensemble_weight(tmp_path: Path) -> None:
    shared, own = (ModelCheckpoint.load(_checkpoint(tmp_path, seed, pixdim=None)) for seed in (3, 4))
    personal = tmp_path / "personal.pt"
    dataclasses.replace(own, ensemble_weight=(0.8,)).save(personal)  # softmax outputs: one weight
    image = _volume(tmp_path)
    [out] = predict([tmp_path / "model-3.pt", personal], image, tmp_path / "out.nii.gz")
    mean = 0.8 * probabilities(own, image) + 0.2 * probabilities(shared, image)
    equal = (probabilities(own, image) + probabilities(shared, image)) / 2
    result = np.asarray(nib.load(str(out)).dataobj)
    np.testing.assert_array_equal(result, mean.argmax(0).numpy())
    assert (result != equal.argmax(0).numpy()).any()  # the weights changed some voxels
    with pytest.raises(PredictError, match="one site's personal model"):
        predict([personal, personal], image, tmp_path / "two.nii.gz")


def test_bad_inputs_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(PredictError, match="at least one --model"):
        predict([], tmp_path, tmp_path / "out")
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": 1}, bogus)
    with pytest.raises(CheckpointError, match=r"bogus.pt: not a fedseg model file"):
        predict([bogus], tmp_path, tmp_path / "out")
    with pytest.raises(PredictError, match=r"missing.nii.gz: input not found"):
        predict([_checkpoint(tmp_path, 1, None)], tmp_path / "missing.nii.gz", tmp_path / "out.nii.gz")
