"""DP-SGD recipe at a site: augmentation multiplicity (one clipped gradient per subject), physical
batches under a large logical batch, and the CSPRNG noise source."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedseg.config import ConfigError, RunConfig
from fedseg.data.datasets import training_dataset
from fedseg.data.sites import load_site_split
from fedseg.data.synth import write_site
from fedseg.privacy import DPSettings, PrivacyLedger, SitePrivacy, SubjectPatches, epsilon_of
from fedseg.trainer import SegmentationTrainer

PATCH = (16, 16, 16)
DELTA = 1e-5


@pytest.fixture(scope="module")
def train_items(tmp_path_factory: pytest.TempPathFactory) -> list:
    site_dir = write_site(tmp_path_factory.mktemp("sites"), 0, num_subjects=8, size=24, seed=0)
    return load_site_split(site_dir, seed=0).train


def dp_trainer(batch_size: int) -> SegmentationTrainer:
    torch.manual_seed(0)
    return SegmentationTrainer("unet", 3, PATCH, batch_size=batch_size, learning_rate=0.01, dp_compatible=True)


def one_step(items: list, settings: DPSettings, tmp_path: Path) -> tuple[int, float, float, torch.Tensor]:
    """(patches in the batch, clipped-sum norm, noise std, first parameter's per-subject gradients) of one step."""
    multiplicity = settings.augmentation_multiplicity
    data = training_dataset(items[:1], PATCH, samples_per_volume=multiplicity)  # one subject: rate 1
    trainer = dp_trainer(batch_size=1)
    privacy = SitePrivacy(settings, PrivacyLedger(tmp_path / "ledger.json"))
    optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.0)
    with privacy.attach(trainer.model, optimizer, data, batch_size=1, epochs=1) as (dp_optimizer, batches, model):
        batch = next(iter(batches))
        dp_optimizer.zero_grad(set_to_none=True)
        trainer.loss_fn(model(batch["image"]), batch["label"]).backward()
        dp_optimizer.step()
        inner = getattr(dp_optimizer, "optimizer", dp_optimizer)
        first = inner.params[0].grad_sample.clone()
        clipped = torch.cat([p.summed_grad.flatten() for p in inner.params])
        noise = torch.cat([(p.grad - p.summed_grad).flatten() for p in inner.params])
    return len(batch["image"]), float(clipped.norm()), float(noise.std()), first


def test_augmentation_multiplicity_clips_one_gradient_per_subject(train_items: list, tmp_path: Path) -> None:
    settings = DPSettings(0.5, 1e-3, DELTA, augmentation_multiplicity=4)
    patches, clipped_norm, noise_std, per_subject = one_step(train_items, settings, tmp_path)
    assert patches == 4  # four augmented patches of the one subject went through the network ...
    assert per_subject.shape[0] == 1  # ... and gave one gradient, clipped as one privacy unit
    assert clipped_norm == pytest.approx(1e-3, rel=1e-3)
    assert noise_std == pytest.approx(0.5 * 1e-3, rel=0.02)


def test_subject_patches_checks_the_multiplicity(train_items: list) -> None:
    data = training_dataset(train_items[:2], PATCH, samples_per_volume=3)
    image, label = SubjectPatches(data, 3)[0]
    assert image.shape == (3, 1, *PATCH) and label.shape == (3, 1, *PATCH)
    with pytest.raises(ValueError, match="needs 1 patch"):
        SubjectPatches(data, 1)[0]


def test_secure_noise_source_clips_noises_and_accounts(train_items: list, tmp_path: Path) -> None:
    settings = DPSettings(0.8, 1e-3, DELTA, noise_source="secure")
    _, clipped_norm, noise_std, _ = one_step(train_items, settings, tmp_path)
    assert clipped_norm == pytest.approx(1e-3, rel=1e-3)
    assert noise_std == pytest.approx(0.8 * 1e-3, rel=0.02)


def test_physical_batches_keep_the_logical_batch_and_its_epsilon(train_items: list, tmp_path: Path) -> None:
    data = training_dataset(train_items, PATCH, samples_per_volume=2)
    batch_size = len(train_items)  # one logical batch per epoch (rate 1), split into physical batches of 2
    settings = DPSettings(1.0, 1.0, DELTA, physical_batch_size=2, augmentation_multiplicity=2, noise_source="secure")
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    trainer = dp_trainer(batch_size)
    result = trainer.fit(data, epochs=2, seed=0, privacy=SitePrivacy(settings, ledger))
    assert ledger.load() == [(1.0, 1.0, 2)]  # two logical steps at rate 1, whatever the physical split
    assert result.steps >= 2 * math.ceil(len(train_items) / 2) - 2  # several physical passes per logical step
    assert SitePrivacy(settings, ledger).epsilon == epsilon_of([(1.0, 1.0, 2)], DELTA)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dp-augmentation-multiplicity": 0}, "'dp-augmentation-multiplicity' must be in [1, 64]"),
        ({"dp-physical-batch-size": -1}, "'dp-physical-batch-size' must be 0 (batch-size) to 1024, got -1"),
        ({"dp-physical-batch-size": 1e308}, "'dp-physical-batch-size' must be 0 (batch-size) to 1024"),
        ({"dp-noise-source": "urandom"}, "'dp-noise-source' is 'urandom'; choose one of: torch, secure"),
    ],
)
def test_bad_recipe_keys_are_rejected(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping(values)
    assert message in str(err.value)
