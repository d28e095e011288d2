"""Sharpness-aware local steps (`sam-rho`): each step applies the gradient taken at w + ρ·g/‖g‖."""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import torch
from inprocess_grid import InProcessGrid, run_federation, task_identity, tiny_config
from torch import nn

import clients.site_runtime
import fedseg.trainer
from fedseg.config import ConfigError, RunConfig
from fedseg.optim import optimizer_factory
from fedseg.sharpness import ascended
from fedseg.trainer import FitResult, SegmentationTrainer

PATCH = (16, 16, 16)
__all__ = ["task_identity"]  # the fixture


def test_ascent_moves_along_the_normalised_gradient_and_restores_exactly() -> None:
    torch.manual_seed(0)
    layer, frozen = nn.Linear(4, 3), nn.Parameter(torch.randn(2))
    layer.weight.grad, layer.bias.grad = torch.randn(3, 4), torch.randn(3)
    params = [layer.weight, layer.bias, frozen]  # `frozen` has no gradient
    before = [p.detach().clone() for p in params]
    norm = torch.sqrt(layer.weight.grad.square().sum() + layer.bias.grad.square().sum())
    with ascended(params, 0.3):
        assert torch.allclose(layer.weight, before[0] + 0.3 * layer.weight.grad / norm, atol=1e-7)
        assert torch.allclose(layer.bias, before[1] + 0.3 * layer.bias.grad / norm, atol=1e-7)
        moved = torch.cat([(p - b).flatten() for p, b in zip(params[:2], before, strict=False)])
        assert torch.linalg.vector_norm(moved).item() == pytest.approx(0.3, rel=1e-5)
        assert torch.equal(frozen, before[2])
    for param, original in zip(params, before, strict=True):
        assert torch.equal(param, original)  # bit for bit, not w + e − e


def test_a_zero_gradient_ascends_nowhere() -> None:
    layer = nn.Linear(3, 2)
    layer.weight.grad, layer.bias.grad = torch.zeros(2, 3), torch.zeros(2)
    before = [p.detach().clone() for p in layer.parameters()]
    with ascended(list(layer.parameters()), 0.05):
        assert all(torch.equal(p, b) for p, b in zip(layer.parameters(), before, strict=True))


def _batch() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    image = torch.randn(1, *PATCH, generator=generator)
    label = torch.randint(0, 3, (1, *PATCH), generator=generator)
    return [{"image": image, "label": label}]


def _trainer(sam_rho: float, **model_args: object) -> SegmentationTrainer:
    return SegmentationTrainer(
        "unet",
        3,
        PATCH,
        batch_size=1,
        learning_rate=0.1,
        optimizer=optimizer_factory("sgd", momentum=0.0),
        sam_rho=sam_rho,
        model_args=model_args,
    )


def test_a_sharpness_aware_step_applies_the_gradient_at_the_ascended_weights() -> None:
    rho, lr, data = 0.05, 0.1, _batch()
    trained = _trainer(rho)
    start = {name: value.clone() for name, value in trained.get_weights().items()}  # (views of the weights)
    trained.fit(data, epochs=1)  # one batch: one step

    reference = _trainer(0.0)
    reference.set_weights(start)
    model, batch = reference.model, data[0]
    target = reference.labels.loss_target(batch["label"][None])

    def gradients() -> list[torch.Tensor]:
        model.zero_grad()
        reference.loss_fn(model(batch["image"][None]), target).backward()
        return [p.grad.clone() for p in model.parameters()]

    model.train()
    first = gradients()
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in first]))
    with torch.no_grad():
        for p, g in zip(model.parameters(), first, strict=True):
            p.add_(rho * g / norm)
    ascended_gradients = gradients()
    names = [name for name, _ in model.named_parameters()]
    expected = {n: start[n] - lr * g for n, g in zip(names, ascended_gradients, strict=True)}
    plain = {n: start[n] - lr * g for n, g in zip(names, first, strict=True)}
    after = trained.get_weights()
    for name in names:
        torch.testing.assert_close(after[name], expected[name], rtol=1e-5, atol=1e-6)
    # the test can tell the two apart: a plain step lands elsewhere
    assert max((after[n] - plain[n]).abs().max().item() for n in names) > 1e-4


def test_batch_norm_statistics_count_one_batch_per_step() -> None:
    """The pass at the ascended weights must not move running statistics: they equal a plain step's."""
    with_sam, plain = _trainer(0.05, norm="batch"), _trainer(0.0, norm="batch")
    plain.set_weights(with_sam.get_weights())
    with_sam.fit(_batch(), epochs=1)
    plain.fit(_batch(), epochs=1)
    statistics = {k: v for k, v in with_sam.get_weights().items() if "running" in k or "num_batches" in k}
    assert statistics and all(v.item() == 1 for k, v in statistics.items() if k.endswith("num_batches_tracked"))
    for key, value in statistics.items():
        assert torch.equal(value, plain.get_weights()[key]), key


def test_sharpness_aware_steps_refuse_fp16_loss_scaling() -> None:
    trainer = _trainer(0.05)
    trainer.precision = type(trainer.precision).resolve("fp16", torch.device("cuda"))
    with pytest.raises(ValueError, match="sharpness-aware steps need plain gradients"):
        trainer.fit(_batch(), epochs=1)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sam-rho": -0.1}, r"'sam-rho' must be in \[0, 10\], got -0.1"),
        ({"sam-rho": 11.0}, r"'sam-rho' must be in \[0, 10\], got 11.0"),
        ({"sam-rho": "nan"}, r"'sam-rho' must be a number, got 'nan'"),
        ({"sam-rho": float("inf")}, r"'sam-rho' must be a finite number"),
        ({"sam-rho": "wide"}, r"'sam-rho'"),
        ({"sam-rho": 0.05, "dp-sgd": True, "dp-noise-multiplier": 1.0}, r"'sam-rho' needs plain gradients.*dp-sgd"),
        ({"sam-rho": 0.05, "precision": "fp16"}, r"'sam-rho' needs plain gradients.*fp16"),
    ],
)
def test_bad_sam_rho_is_refused_before_training(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_mapping(values)


def test_sam_rho_reaches_the_run_config() -> None:
    assert RunConfig.from_mapping({"sam-rho": 0.05}).sam_rho == 0.05
    assert RunConfig.from_mapping({}).sam_rho == 0.0


@pytest.mark.parametrize("rho", [0.0, 0.05])
def test_every_site_step_of_a_federated_run_ascends_with_the_configured_radius(
    tmp_path: Path, task_identity: None, monkeypatch: pytest.MonkeyPatch, rho: float
) -> None:
    radii: list[float] = []
    steps: list[int] = []
    fit = SegmentationTrainer.fit

    def recording(params: list[nn.Parameter], radius: float) -> AbstractContextManager[None]:
        radii.append(radius)
        return ascended(params, radius)

    def counting_fit(self: SegmentationTrainer, *args: Any, **kwargs: Any) -> FitResult:
        result = fit(self, *args, **kwargs)
        steps.append(result.steps)
        return result

    monkeypatch.setattr(fedseg.trainer, "ascended", recording)
    monkeypatch.setattr(SegmentationTrainer, "fit", counting_fit)
    clients.site_runtime._build_runtime.cache_clear()
    values = tiny_config(tmp_path, **{"num-server-rounds": 1, "sam-rho": rho})
    run_federation(InProcessGrid(values, 2), values, tmp_path / "run")
    assert len(steps) == 2 and sum(steps) > 0  # two sites, one round
    assert radii == ([rho] * sum(steps) if rho else [])
