"""Sharpness-aware minimisation (SAM; Foret et al. 2021) for the sites' local steps.

Each step's gradient is taken at the nearby worst point w + ρ·g/‖g‖ (g: the gradient at w, one norm
over all parameters) and applied at w, steering training towards flat minima. In federated training
flat local minima average into a better global model that generalises to unseen institutions
(Caldarola et al. 2022, FedSAM, with server-side weight averaging: `swa-rounds`). A step costs two
forward and backward passes; ρ 0 is plain training. The loss at the ascended point is the whole
training loss, a proximal term (FedProx, Ditto) included; running normalisation statistics are
updated by the first pass only (`kept_statistics`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def ascended(params: Sequence[nn.Parameter], rho: float) -> Iterator[None]:
    """Move `params` by ρ·g/‖g‖ along their current gradients for the body, then put back the exact
    weights they had (a copy, not a subtraction: no rounding drift). Parameters without a gradient stay."""
    moved = [p for p in params if p.grad is not None]
    originals = [p.detach().clone() for p in moved]
    if moved:
        with torch.no_grad():
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in moved]))
            scale = rho / (norm + 1e-12)
            for p in moved:
                p.add_(p.grad * scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, original in zip(moved, originals, strict=True):
                p.copy_(original)


@contextmanager
def kept_statistics(model: nn.Module) -> Iterator[None]:
    """Put back every batch-norm layer's running statistics (mean, variance, batch count) after the body,
    so the extra pass at the ascended weights does not count as a second batch."""
    saved = [
        (module, {name: buffer.clone() for name, buffer in module.named_buffers(recurse=False)})
        for module in model.modules()
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, buffers in saved:
                for name, value in buffers.items():
                    getattr(module, name).copy_(value)
