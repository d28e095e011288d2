"""Client-level DP bookkeeping for `dp-noised`: site sampling, adaptive clipping, the privacy ledger.

**Sampling** (`sampling`): "all" (every connected site each round, no amplification), "poisson"
(each site joins a round independently with probability q = min(1, m / N), m = `cohort-size`,
N = sites connected that round) or "fixed" (exactly min(m, N) sites drawn without replacement).

**Noise calibrated to the cohort.** The clipped updates are summed, Gaussian noise of std
z_Δ·C is added, and the sum is divided by a public denominator: the number of replies ("all"),
or m, the expected / drawn cohort size ("poisson", "fixed"). A fixed denominator keeps one
site's influence at C/m whether or not others were drawn or failed (McMahan et al. 2018).

**Adaptive clipping** (Andrew et al. 2021, `target-quantile` γ > 0): each round the server also
releases the noised count of sampled sites whose update norm was at most C,
b̃ = (Σᵢ(bᵢ − ½) + N(0, σ_b²)) / m + ½, and moves the bound geometrically towards the γ-quantile
of the update norms: C ← C · exp(−η (b̃ − γ)). The two Gaussian queries (sensitivities C and ½)
are one Gaussian query with noise multiplier z = (z_Δ⁻² + (2σ_b)⁻²)^(-½): `noise-multiplier` is
that total z, the update noise gets the rest, z_Δ = (z⁻² − (2σ_b)⁻²)^(-½) (σ_b > z / 2 is
required; by default σ_b = max(m / 20, z)).

**Accounting.** Every round is one release, written to the ledger as (z, sampling, N, m) and
composed with Google's dp-accounting RDP accountant: GaussianDpEvent(z) ("all"),
PoissonSampledDpEvent(q, GaussianDpEvent(z)) ("poisson", add-or-remove-one neighbours) or
SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2)) ("fixed": replace-one neighbours,
where one site changes the sum by up to 2C). Each event carries its own N, so a site that joins
(or leaves) mid-run changes the next events, never the past ones.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant

from fedseg.noise import GaussianSource
from strategies.params import Param

SAMPLINGS = ("all", "poisson", "fixed")
TARGET_DELTA = Param("target-delta", float, 1e-5, "δ at which the cumulative ε is reported", minimum=1e-12, maximum=0.5)


class _SkippedOrderNote(logging.Filter):
    """dp-accounting warns for every fractional RDP order (1.1, 1.2, ...) whose sampled-Gaussian series
    does not converge; the order is left out and ε stays a valid bound, so the lines (dozens per
    round) say nothing a run's log needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_SkippedOrderNote())
_RELATIONS = {
    "all": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "poisson": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "fixed": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


@dataclass(frozen=True)
class Release:
    """One round's private release: total noise multiplier, how sites were sampled, from how many."""

    noise_multiplier: float
    sampling: str
    population: int  # N: sites connected when the cohort was drawn
    cohort: int  # m: expected ("poisson") or exact ("fixed") cohort; N for "all"

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.cohort / self.population)

    def dp_event(self) -> dp_accounting.DpEvent:
        """This release as a dp-accounting event."""
        if self.sampling == "all":
            return dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling == "poisson":
            return dp_accounting.PoissonSampledDpEvent(
                self.sample_rate, dp_accounting.GaussianDpEvent(self.noise_multiplier)
            )
        return dp_accounting.SampledWithoutReplacementDpEvent(
            self.population, min(self.cohort, self.population), dp_accounting.GaussianDpEvent(self.noise_multiplier / 2)
        )


def epsilon_of(releases: Sequence[Release], delta: float) -> float:
    """Cumulative ε at `delta` of the releases (RDP), 0 before the first."""
    if not releases:
        return 0.0
    accountant = RdpAccountant(neighboring_relation=_RELATIONS[releases[0].sampling])
    for release, count in _runs(releases):
        accountant.compose(release.dp_event(), count)
    return float(accountant.get_epsilon(delta))


def _runs(releases: Sequence[Release]) -> Iterable[tuple[Release, int]]:
    """Consecutive equal releases as (release, count): composing a run at once is one RDP evaluation."""
    count = 0
    for i, release in enumerate(releases):
        count += 1
        if i + 1 == len(releases) or releases[i + 1] != release:
            yield release, count
            count = 0


def releases_to_state(releases: Sequence[Release]) -> list[dict[str, Any]]:
    return [asdict(release) for release in releases]


def releases_from_state(entries: Iterable[Mapping[str, Any]]) -> list[Release]:
    return [
        Release(float(e["noise_multiplier"]), str(e["sampling"]), int(e["population"]), int(e["cohort"]))
        for e in entries
    ]


def releases_from_flower_state(state: Mapping[str, Any]) -> list[Release]:
    """The releases of a checkpoint written by the former Flower-accountant dp-noised (every site, no sampling)."""
    releases = []
    for composition in state.get("compositions", []):
        event = composition["event"]
        release = Release(
            float(event["noise_multiplier"]), "all", int(event["population_size"]), int(event["population_size"])
        )
        releases += [release] * int(composition["count"])
    return releases


# ---------------------------------------------------------------------------- site sampling
def draw_cohort(nodes: Sequence[int], sampling: str, cohort: int, source: GaussianSource) -> list[int]:
    """The nodes taking part this round: all, each with probability min(1, m/N), or m without replacement."""
    if sampling == "all" or not nodes:
        return list(nodes)
    draws = source.random(len(nodes))
    if sampling == "poisson":
        rate = min(1.0, cohort / len(nodes))
        return [node for node, u in zip(nodes, draws, strict=True) if u < rate]
    chosen = sorted(np.argsort(draws)[:cohort])  # a uniformly random m-subset
    return [nodes[i] for i in chosen]


# ---------------------------------------------------------------------------- adaptive clipping
def update_noise_multiplier(total: float, count_stddev: float) -> float:
    """z_Δ for the update sum when the clip count takes noise σ_b and the round's total is `total`."""
    if count_stddev <= 0:
        return total
    if 2 * count_stddev <= total:
        raise ValueError(f"clip-count-stddev {count_stddev:g} must exceed noise-multiplier / 2 = {total / 2:g}")
    return (total**-2 - (2 * count_stddev) ** -2) ** -0.5


def default_count_stddev(cohort: float, total: float) -> float:
    """σ_b when unset: m / 20 (Andrew et al.'s recommendation), at least z so that z_Δ ≤ 1.16 z."""
    return max(cohort / 20, total)


@dataclass(frozen=True)
class QuantileClip:
    """Geometric update of the clipping bound towards the γ-quantile of update norms (Andrew et al. 2021)."""

    target_quantile: float  # γ
    learning_rate: float = 0.2  # η

    def noised_fraction(
        self, norms: Sequence[float], bound: float, cohort: float, count_stddev: float, source: GaussianSource
    ) -> float:
        """b̃: the fraction of the cohort with norm ≤ bound, from the noised centred count."""
        centred = sum((1.0 if norm <= bound else 0.0) - 0.5 for norm in norms)
        noise = float(source.normal(0.0, count_stddev, 1)[0]) if count_stddev > 0 else 0.0
        return (centred + noise) / cohort + 0.5

    def next_bound(self, bound: float, fraction: float) -> float:
        """C · exp(−η (b̃ − γ))."""
        return bound * math.exp(-self.learning_rate * (fraction - self.target_quantile))
