"""The one range check of a recorded privacy guarantee (ε, δ), shared by the run history's readers
(fedseg.experiments.evaluation) and cases.csv's (fedseg.report.cases). Light on purpose: the report
does not load Opacus.

A run never records an infinite ε: a noise multiplier of 0 is no guarantee and is recorded as no DP
(strategies.dp_noised), so ε = inf in a record is garbage, not a result."""

from __future__ import annotations

import math


def budget_fault(epsilon: float, delta: float) -> str | None:
    """Why (ε, δ) is no privacy guarantee (ε finite and >= 0, δ in [0, 1)), else None."""
    if not (math.isfinite(epsilon) and epsilon >= 0):
        return f"ε = {epsilon} is not a finite number >= 0"
    if not 0 <= delta < 1:  # NaN fails too
        return f"δ = {delta} is not a number in [0, 1)"
    return None
