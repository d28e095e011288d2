"""Dice per class via MONAI, from logits and integer label maps."""

from __future__ import annotations

import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot


def dice_per_class(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Dice of each foreground class for each case: shape (batch, classes - 1); NaN where both are empty."""
    num_classes = logits.shape[1]
    prediction = one_hot(logits.argmax(dim=1, keepdim=True), num_classes)
    target = one_hot(label.long(), num_classes)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    return metric(prediction, target)
