"""Enhancing-tumour post-processing chosen on validation Dice (run-config `postprocess = "enhancing-tumour"`).

BraTS scores the enhancing tumour (ET) of a case without one as 1 when the model predicts none and 0
when it predicts a single voxel, so a low-grade glioma's few false-positive ET voxels cost a whole
Dice point of ET. The BraTS winners' answer (Isensee et al. 2021, nnU-Net) is a threshold: an ET
prediction smaller than it becomes tumour core, the threshold chosen on validation data.

fedseg chooses it without any scan leaving a site: each site scores its validation split at every
candidate of `CANDIDATES` and sends the mean ET Dice per candidate (aggregate numbers, as its
validation Dice); the server takes the candidate with the best mean over the sites (ties: the
smallest, i.e. the least change) and stores it with the model (fedseg.labels.LabelScheme
`enhancing_min_voxels`), so evaluation, `fedseg predict` and experiments apply it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from fedseg import messages as m
from fedseg.labels import BRATS_ENHANCING, LabelScheme

ENHANCING_TUMOUR = "enhancing-tumour"
POSTPROCESS = ("none", ENHANCING_TUMOUR)  # run-config `postprocess`
# Voxel counts on the grid the model works at: 0 (keep every prediction), then 1, 2, 4, … 65536.
CANDIDATES: tuple[int, ...] = (0, *(2**k for k in range(17)))
_ET = 2  # the enhancing tumour's column in LabelScheme.structures (WT, TC, ET)


def describe(min_voxels: int) -> str:
    """The threshold in words, for logs and model descriptions."""
    return f"enhancing tumour under {min_voxels} voxels becomes core"


def candidate_key(min_voxels: int) -> str:
    """The reply metric holding a site's mean validation ET Dice at one candidate."""
    return f"{m.VAL_ENHANCING_PREFIX}{min_voxels}"


def enhancing_dice_by_candidate(labels: LabelScheme, probabilities: torch.Tensor, label: torch.Tensor) -> np.ndarray:
    """(cases, candidates): each case's ET Dice if an ET prediction of fewer voxels than the candidate
    became core. Only the emptied cases change: to 1 when the truth has no ET, else to 0."""
    plain = dataclasses.replace(labels, enhancing_min_voxels=0)
    predicted = plain.label_map(probabilities)
    counts = (predicted == BRATS_ENHANCING).flatten(1).sum(dim=1).numpy()
    truth_empty = ~plain.masks(label)[:, _ET].flatten(1).any(dim=1).numpy()
    kept = plain.dice(probabilities, label)[:, _ET].numpy()
    emptied = (counts[:, None] > 0) & (counts[:, None] < np.asarray(CANDIDATES)[None, :])
    return np.where(emptied, truth_empty[:, None].astype(float), kept[:, None])


def candidate_metrics(per_case: np.ndarray) -> dict[str, float]:
    """A site's reply metrics: the mean validation ET Dice at each candidate (nothing per case)."""
    if not len(per_case):
        return {}
    means = per_case.mean(axis=0)
    return {candidate_key(c): float(v) for c, v in zip(CANDIDATES, means, strict=True)}


def choose_min_voxels(sites: Iterable[Mapping[str, float]]) -> tuple[int, float, float]:
    """(threshold, mean ET Dice without it, with it) from the sites' reply metrics: the candidate with the
    best unweighted mean over the sites that sent every candidate (each site counts once, as the
    validation Dice that picks the best round); (0, nan, nan) when none did."""
    rows = [[site[candidate_key(c)] for c in CANDIDATES] for site in sites if _complete(site)]
    if not rows:
        return 0, math.nan, math.nan
    means = np.asarray(rows, dtype=float).mean(axis=0)
    best = int(np.argmax(means))  # the first (smallest) of equal means
    return CANDIDATES[best], float(means[0]), float(means[best])


def smallest_threshold(labels: Sequence[LabelScheme]) -> LabelScheme:
    """One scheme for an ensemble of models: the first's, with the smallest threshold among them."""
    return dataclasses.replace(labels[0], enhancing_min_voxels=min(scheme.enhancing_min_voxels for scheme in labels))


def _complete(site: Mapping[str, float]) -> bool:
    values = [site.get(candidate_key(c)) for c in CANDIDATES]
    return all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in values)
