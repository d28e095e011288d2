"""Run-config `precision` and `num-workers` reach the training loop: the network computes in the chosen
dtype, fp16 gradients are unscaled before they are used, and worker processes load the same data."""

from __future__ import annotations

import pytest
import torch

from fedseg.data.datasets import training_dataset
from fedseg.data.sites import load_site_split
from fedseg.data.synth import write_site
from fedseg.precision import Precision
from fedseg.trainer import SegmentationTrainer

PATCH = (16, 16, 16)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory):
    site_dir = write_site(tmp_path_factory.mktemp("sites"), 0, num_subjects=4, size=24, seed=0)
    return training_dataset(load_site_split(site_dir, seed=0).train, PATCH)


def _trainer(**options: object) -> SegmentationTrainer:
    torch.manual_seed(0)
    return SegmentationTrainer(
        "unet", num_classes=3, patch_size=PATCH, batch_size=2, learning_rate=0.01, device="cpu", **options
    )


def test_auto_is_bf16_on_a_gpu_and_fp32_on_a_cpu() -> None:
    assert Precision.resolve("auto", torch.device("cuda")).dtype == torch.bfloat16
    assert Precision.resolve("auto", torch.device("cpu")).dtype is None
    assert Precision.resolve("fp16", torch.device("cpu")).scaler().is_enabled()
    assert not Precision.resolve("bf16", torch.device("cuda")).scaler().is_enabled()
    with pytest.raises(ValueError, match="precision 'fp8'"):
        Precision.resolve("fp8", torch.device("cpu"))


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_training_computes_in_the_chosen_precision(train_set, precision: str, dtype: torch.dtype) -> None:
    trainer = _trainer(precision=precision)
    seen: list[torch.dtype] = []
    first_conv = next(m for m in trainer.model.modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    start = {key: value.clone() for key, value in trainer.get_weights().items()}
    result = trainer.fit(train_set, epochs=1, seed=1)
    assert seen and set(seen) == {dtype}
    assert torch.isfinite(torch.tensor(result.train_loss))
    assert any(not torch.equal(start[k], v) for k, v in trainer.get_weights().items())  # it trained


def test_fp16_gradients_are_unscaled_before_use(train_set) -> None:
    """SCAFFOLD's mean gradients (and the step) must see true gradients, not ones scaled by 2^16."""
    norms = {}
    for precision in ("fp32", "fp16"):
        result = _trainer(precision=precision).fit(train_set, epochs=1, seed=1, average_gradients=True)
        norms[precision] = torch.sqrt(sum((g.float() ** 2).sum() for g in result.mean_gradients.values()))
    assert 0.5 < float(norms["fp16"] / norms["fp32"]) < 2.0


def test_worker_processes_load_the_data_reproducibly(train_set) -> None:
    losses = [_trainer(num_workers=1).fit(train_set, epochs=1, seed=3).train_loss for _ in range(2)]
    assert losses[0] == losses[1] and losses[0] > 0
