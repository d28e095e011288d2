"""How much a site's personal model counts in its mean with the global model, chosen on validation Dice.

Ditto leaves each site two models: the global one and its own. The mean of their probabilities reads
the site's annotators from the personal model and what few local cases teach badly (the tumour core)
from the global one. How much of each is best differs per structure, and one site's validation split
is too small to tell (one or two cases), so the federation chooses, as it chooses the enhancing-tumour
threshold (fedseg.enhancing): each site that keeps a whole personal model scores its validation split
at every weight of `CANDIDATES` and sends the mean Dice per structure and weight (aggregate numbers);
the server takes, per structure, the weight with the best unweighted mean over the sites (ties: the
smaller, the global model's side) and stores it with the model (ModelCheckpoint `personal_weight`).

Weights are per output channel for sigmoid regions (one per structure) and one for every channel
for a softmax (the weight with the best mean over the structures). A site scores each candidate with
the same weight on every channel, while BraTS regions are nested when scored (TC inside WT, ET inside
TC), so the per-region choice is measured as a whole only where the stored model is tested (the
experiment's `<arm>-ensemble` rows). The candidates are scored without the enhancing-tumour threshold
(fedseg.enhancing), which is chosen on the global model alone and then applied to the mean too.
`best-model.pt` carries the weight chosen at its round, while a site keeps only its latest personal
model. The weight of the personal model travels with it when a site exports it
(`fedseg site personal-model`: ModelCheckpoint `ensemble_weight`), so `fedseg predict --model model.pt
--model personal.pt` segments with the chosen mean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from fedseg import messages as m
from fedseg.labels import LabelScheme

CANDIDATES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # the personal model's weight; 0: the global model
Weights = tuple[float, ...]  # one per output channel, or one for all


class EnsembleError(ValueError):
    """An ensemble the weights cannot describe (more than one personal model, weights of another length)."""


def candidate_key(structure: str, weight: float) -> str:
    """The reply metric holding a site's mean validation Dice of `structure` at one personal weight."""
    return f"{m.VAL_PERSONAL_WEIGHT_PREFIX}{structure}-{weight}"


def dice_by_candidate(
    labels: LabelScheme, shared: torch.Tensor, personal: torch.Tensor, label: torch.Tensor
) -> np.ndarray:
    """(cases, candidates, structures): each structure's Dice of the mean at every candidate weight."""
    return np.stack([labels.dice(w * personal + (1 - w) * shared, label).numpy() for w in CANDIDATES], axis=1)


def candidate_metrics(labels: LabelScheme, per_case: np.ndarray) -> dict[str, float]:
    """A site's reply metrics: the mean validation Dice per structure and weight (nothing per case); a
    structure no case defines (NaN Dice throughout) is left out."""
    metrics = {}
    for index, structure in enumerate(labels.structures):
        scores = per_case[:, :, index]
        defined = ~np.isnan(scores).all(axis=0)
        if len(scores) and defined.all():
            means = np.nanmean(scores, axis=0)
            metrics.update({candidate_key(structure, w): float(v) for w, v in zip(CANDIDATES, means, strict=True)})
    return metrics


def choose_personal_weight(sites: Iterable[Mapping[str, float]], labels: LabelScheme) -> Weights | None:
    """The personal model's weight per output channel (sigmoid regions) or for all channels (softmax:
    the mean over the structures of each structure's mean) from the sites' reply metrics. A structure's
    mean is over the sites that sent a Dice in [0, 1] at every weight for it (each counts once; a site
    whose validation cases lack a structure sends none for it); None when no site did for a structure."""
    sites = list(sites)
    means = []
    for structure in labels.structures:
        voters = [site for site in sites if _complete(site, structure)]
        if not voters:
            return None
        means.append(np.asarray([[site[candidate_key(structure, w)] for w in CANDIDATES] for site in voters]).mean(0))
    if labels.region_training:
        return tuple(CANDIDATES[int(np.argmax(row))] for row in means)  # argmax: the first (smallest) of equals
    return (CANDIDATES[int(np.argmax(np.mean(means, axis=0)))],)


def describe(weight: Weights, labels: LabelScheme) -> str:
    """The weights in words, for logs and model descriptions."""
    if len(weight) == 1:
        return f"a site's personal model weighs {weight[0]:g} in its mean with the global model"
    parts = ", ".join(f"{s} {w:g}" for s, w in zip(labels.structures, weight, strict=True))
    return f"a site's personal model weighs {parts} in its mean with the global model"


def check_weight(weight: object, out_channels: int, key: str) -> Weights | None:
    """A model file's weight field, checked: None, or 1 or `out_channels` numbers in [0, 1] (ValueError)."""
    if weight is None:
        return None
    if (
        not isinstance(weight, list | tuple)
        or len(weight) not in {1, out_channels}
        or not all(isinstance(w, int | float) and not isinstance(w, bool) and 0.0 <= w <= 1.0 for w in weight)
    ):
        raise ValueError(f"'{key}' must be 1 or {out_channels} numbers from 0 to 1, got {weight!r}")
    return tuple(float(w) for w in weight)


def ensemble_mean(probabilities: Sequence[torch.Tensor], ensemble_weights: Sequence[Weights | None]) -> torch.Tensor:
    """The members' mean probability ((batch, channels, …) each): equal weights, unless one member is a
    site's personal model with its `ensemble_weight`: it counts that much per channel, the others share
    the rest."""
    stacked = torch.stack(list(probabilities))
    weighted = [i for i, w in enumerate(ensemble_weights) if w is not None]
    if not weighted:
        return stacked.mean(dim=0)
    if len(weighted) > 1:
        raise EnsembleError("an ensemble can hold one site's personal model, not several")
    if len(stacked) == 1:
        return stacked[0]
    own = weighted[0]
    channels = stacked.shape[2]
    weight = torch.tensor(ensemble_weights[own], dtype=stacked.dtype, device=stacked.device)
    if len(weight) not in {1, channels}:
        raise EnsembleError(f"the personal model's weight has {len(weight)} values for {channels} output channels")
    weight = weight.expand(channels).view(1, channels, *([1] * (stacked.dim() - 3)))
    others = [i for i in range(len(stacked)) if i != own]
    return weight * stacked[own] + (1 - weight) * stacked[others].mean(dim=0)


def _complete(site: Mapping[str, float], structure: str) -> bool:
    values = [site.get(candidate_key(structure, w)) for w in CANDIDATES]
    return all(isinstance(v, float) and math.isfinite(v) and 0.0 <= v <= 1.0 for v in values)
