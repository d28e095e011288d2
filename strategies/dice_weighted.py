"""`dice-weighted`: each site's model counts by its validation Dice (Sarma et al. 2021, JAMIA:
federated prostate segmentation, aggregation weighted by each site's validation Dice).

    wᵢ = (1 − λ) · dᵢ / Σⱼ dⱼ  +  λ · nᵢ / Σⱼ nⱼ
    w_global ← Σᵢ wᵢ · w_siteᵢ

dᵢ is the reply's `val-dice` (mean foreground Dice of the site's freshly trained model on its
own validation split, in [0, 1]), nᵢ its `num-examples`, λ the parameter `example-mix`
(0: Dice only, 1: plain FedAvg; default 0.5: over ten seeds of the README's 160 × 0.25 study 98.4 %
of the centralized Dice against 98.0 % with Dice only and 96.7 % FedAvg — Dice-only weights neglect the
largest site, example weights the smallest; with the README's augmentation for unseen protocols λ 0
served the outside institution better). If every site reports
Dice 0 (Σ dᵢ = 0, e.g. an untrained first round) the Dice term is undefined and the round falls
back to example weights (λ = 1), with a warning. A reply whose `val-dice` lies outside [0, 1] is dropped.
`proximal-mu` > 0 adds FedProx's term (mu/2)·‖w − w_global‖² to the sites' losses (default 0: none;
λ 0.5 with mu 0.01 measured 98.9 % over the ten seeds, a gain of +0.004 per scan, P 0.09;
trained to convergence, 80 epochs for every arm, 99.3 %).
"""

from __future__ import annotations

from logging import WARNING
from typing import Any

from flwr.common.logger import log

from fedseg.messages import VAL_DICE
from fedseg.record_values import as_float
from strategies.base import NUM_EXAMPLES, Reply
from strategies.fedprox import ProximalTerm
from strategies.params import Param


def dice_weights(dice: list[float], examples: list[float], example_mix: float) -> list[float]:
    """The formula above; example weights alone when every Dice is 0."""
    total_dice, total_examples = sum(dice), sum(examples)
    if total_dice <= 0:
        example_mix = 1.0
    return [
        (1 - example_mix) * (d / total_dice if total_dice > 0 else 0.0) + example_mix * n / total_examples
        for d, n in zip(dice, examples, strict=True)
    ]


class DiceWeighted(ProximalTerm):
    """Average weighted by validation Dice, optionally mixed with example counts (and FedProx's term)."""

    name = "dice-weighted"
    secure_aggregation_conflict = "it weights each site's update by its validation Dice, not by its examples"
    params = (
        Param(
            "example-mix",
            float,
            0.5,
            "share λ of the example-count weights (0: Dice only, 1: FedAvg)",
            minimum=0.0,
            maximum=1.0,
        ),
    )
    required_metrics = (NUM_EXAMPLES, VAL_DICE)
    example_mix: float

    def __init__(self, min_sites: int = 2, **params: Any) -> None:
        super().__init__(min_sites, **params)
        self._weights: dict[str, float] = {}

    def check_reply(self, reply: Reply) -> str:
        dice = reply.metrics[VAL_DICE]
        return "" if 0.0 <= as_float(dice) <= 1.0 else f"metric '{VAL_DICE}' must be in [0, 1], got {dice!r}"

    def site_weights(self, replies: list[Reply]) -> list[float]:
        dice = [as_float(r.metrics[VAL_DICE]) for r in replies]
        if sum(dice) <= 0:
            log(WARNING, "[fedseg] dice-weighted: every site reports validation Dice 0; using example weights")
        weights = dice_weights(dice, [as_float(r.metrics[NUM_EXAMPLES]) for r in replies], self.example_mix)
        self._weights = {r.site: w for r, w in zip(replies, weights, strict=True)}
        return weights

    def round_report(self, server_round: int) -> dict[str, Any]:
        return {**super().round_report(server_round), "weights": dict(self._weights)}
