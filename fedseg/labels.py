"""What a label map means, how a network is trained on it and how its outputs are scored.

Two schemes (run-config `label-scheme`):

- `classes` (default): labels 0 .. num-classes − 1, one softmax output per class (MONAI DiceCELoss),
  Dice per foreground class. A class absent from a case's truth gives NaN for that case (left out
  of the means).
- `brats`: the BraTS convention — 0 background, 1 necrotic / non-enhancing tumour core, 2 edema,
  4 enhancing tumour (BraTS 2017–2022; 3 in BraTS 2023; both are read, 4 is mapped to 3 on
  loading). Scored on the nested regions the studies report: whole tumour WT = 1 ∪ 2 ∪ 4, tumour
  core TC = 1 ∪ 4, enhancing tumour ET = 4 (MONAI `ConvertToMultiChannelBasedOnBratsClasses`).
  Trained either with softmax over the 4 classes, or with `region-training` as MONAI's BraTS
  recipes do: one sigmoid output per region (MONAI DiceLoss with sigmoid, plus binary cross-entropy
  per region), decoded to a label map by nesting (ET inside TC inside WT).
  Empty regions follow the BraTS challenge: a region absent from both truth and prediction scores
  Dice 1, absent from the truth but predicted scores 0 (e.g. ET of a low-grade glioma).
  A model may carry `enhancing_min_voxels` (fedseg.enhancing, chosen on the sites' validation Dice):
  a case's enhancing-tumour prediction of fewer voxels becomes tumour core (label 1), as the BraTS
  winners post-process (Isensee et al. 2021); WT and TC are unchanged by it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from monai.losses import DiceCELoss, DiceLoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import ConvertToMultiChannelBasedOnBratsClasses
from torch import nn

SCHEMES = ("classes", "brats")
BRATS_CLASSES = 4  # background, core, edema, enhancing (after 4 → 3)
BRATS_CORE = 1  # necrotic / non-enhancing tumour core
BRATS_ENHANCING = 3  # the enhancing tumour's training label (stored as 4 or 3)
BRATS_STORED_ENHANCING = 4  # BraTS 2017–2022 files; BraTS 2023 stores 3
BRATS_REGIONS = ("WT", "TC", "ET")
_MONAI_REGION_ORDER = (1, 0, 2)  # MONAI gives TC, WT, ET; fedseg reports WT, TC, ET


class RegionLoss(nn.Module):
    """Dice (sigmoid per region) + binary cross-entropy per region, for overlapping region targets.

    MONAI's DiceCELoss applies a softmax cross-entropy to multi-channel targets, which treats the
    nested regions as exclusive classes; each region here is its own binary problem."""

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.dice(logits, target) + self.bce(logits, target)


@dataclass(frozen=True)
class LabelScheme:
    """How labels become training targets and scores; see the module docstring."""

    kind: str = "classes"
    num_classes: int = 3
    region_training: bool = False
    enhancing_min_voxels: int = 0  # BraTS: a smaller enhancing-tumour prediction becomes core (0: kept)

    def __post_init__(self) -> None:
        if self.kind not in SCHEMES:
            raise ValueError(f"label scheme '{self.kind}' is unknown; choose one of: {', '.join(SCHEMES)}")
        if self.kind == "brats" and self.num_classes != BRATS_CLASSES:
            raise ValueError(f"label scheme 'brats' has {BRATS_CLASSES} classes (0, 1, 2, 4→3), got {self.num_classes}")
        if self.region_training and self.kind != "brats":
            raise ValueError("region training needs the 'brats' label scheme (its nested tumour regions)")
        if self.enhancing_min_voxels < 0 or (self.enhancing_min_voxels and self.kind != "brats"):
            raise ValueError(
                f"enhancing_min_voxels {self.enhancing_min_voxels}: a voxel count >= 0, and > 0 only with "
                "the 'brats' label scheme (its enhancing tumour)"
            )

    @property
    def out_channels(self) -> int:
        """Network outputs: one per class, or one per region with region training."""
        return len(BRATS_REGIONS) if self.region_training else self.num_classes

    @property
    def structures(self) -> tuple[str, ...]:
        """Names of the scored structures: foreground classes "1", "2", … or the regions WT, TC, ET."""
        return BRATS_REGIONS if self.kind == "brats" else tuple(str(k) for k in range(1, self.num_classes))

    @property
    def metric_names(self) -> tuple[str, ...]:
        """Per-structure metric keys in replies and history.json: dice-class-1, … or dice-WT, dice-TC, dice-ET."""
        prefix = "dice-" if self.kind == "brats" else "dice-class-"
        return tuple(prefix + name for name in self.structures)

    @property
    def allowed_label_values(self) -> tuple[int, ...]:
        """Values a label file may hold (BraTS: enhancing stored as 4 or 3)."""
        if self.kind == "brats":
            return (0, 1, 2, BRATS_ENHANCING, BRATS_STORED_ENHANCING)
        return tuple(range(self.num_classes))

    @property
    def label_mapping(self) -> dict[int, int]:
        """Stored → training label values applied when a label is loaded (BraTS: enhancing 4 → 3)."""
        return {BRATS_STORED_ENHANCING: BRATS_ENHANCING} if self.kind == "brats" else {}

    def loss(self) -> nn.Module:
        """Dice + cross-entropy: softmax over classes, or sigmoid per region (Dice + BCE)."""
        if self.region_training:
            return RegionLoss()
        return DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_target(self, label: torch.Tensor) -> torch.Tensor:
        """The loss's target for a (batch, 1, …) label map: the map itself, or region masks."""
        return self.regions(label).float() if self.region_training else label

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Softmax over classes, or independent sigmoids per region."""
        return torch.sigmoid(logits) if self.region_training else torch.softmax(logits, dim=1)

    def label_map(self, probabilities: torch.Tensor) -> torch.Tensor:
        """(batch, 1, …) integer labels in training values (BraTS enhancing = 3), with the model's
        enhancing-tumour post-processing."""
        if not self.region_training:
            return self._small_enhancing_to_core(probabilities.argmax(dim=1, keepdim=True))
        wt, tc, et = (probabilities[:, i : i + 1] > 0.5 for i in range(3))
        label = torch.zeros_like(wt, dtype=torch.long)
        label[wt] = 2
        label[wt & tc] = 1
        label[wt & tc & et] = BRATS_ENHANCING
        return self._small_enhancing_to_core(label)

    def _small_enhancing_to_core(self, label: torch.Tensor) -> torch.Tensor:
        """Cases whose enhancing tumour has fewer than enhancing_min_voxels voxels: it becomes core."""
        if not self.enhancing_min_voxels:
            return label
        enhancing = label == BRATS_ENHANCING
        small = enhancing.flatten(1).sum(dim=1) < self.enhancing_min_voxels
        small = small.view(-1, *([1] * (label.dim() - 1)))
        return torch.where(enhancing & small, BRATS_CORE, label)

    def regions(self, label: torch.Tensor) -> torch.Tensor:
        """(batch, 3, …) WT, TC, ET masks of a (batch, 1, …) BraTS label map (enhancing 3 or 4)."""
        convert = ConvertToMultiChannelBasedOnBratsClasses(et_label=BRATS_ENHANCING)
        label = torch.where(label == BRATS_STORED_ENHANCING, BRATS_ENHANCING, label)
        masks = torch.stack([torch.as_tensor(convert(case)) for case in label])
        return masks[:, list(_MONAI_REGION_ORDER)]

    def masks(self, label: torch.Tensor) -> torch.Tensor:
        """(batch, structures, …) binary masks of the scored structures of a (batch, 1, …) label map."""
        if self.kind == "brats":
            return self.regions(label)
        return one_hot(label.long(), self.num_classes)[:, 1:]

    def dice(self, probabilities: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Dice of every scored structure for every case: (batch, structures); NaN where undefined
        (classes scheme: structure absent from the truth)."""
        predicted = self.masks(self.label_map(probabilities))
        truth = self.masks(label)
        metric = DiceMetric(include_background=True, reduction="none", ignore_empty=self.kind != "brats")
        return cast(torch.Tensor, metric(predicted, truth))  # MONAI also types list inputs
