"""`fedavg`: the global model is the average of the site models weighted by their training examples.

    w ← Σᵢ nᵢ·wᵢ / Σᵢ nᵢ      (nᵢ = the reply's `num-examples`)

The arithmetic is the base's: float arrays keep their dtype, integer buffers get the rounded
weighted mean.
"""

from __future__ import annotations

from strategies.base import FedSegStrategy


class FedAvg(FedSegStrategy):
    """Federated averaging (McMahan et al. 2017) over every site, weighted by examples."""

    name = "fedavg"
