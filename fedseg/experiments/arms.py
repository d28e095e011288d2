"""The arms of an experiment: what each model trains on, with which strategy, for how long.

Every arm is one Federation run through the LocalGrid (a single-node "federation" for private,
centralized and fine-tuned models), so all arms share the client, the loop and the budget:
each site gets num-server-rounds × local-epochs epochs of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedseg.experiments.spec import ExperimentSpec
from fedseg.report.layout import FEDERATION, arm_id

POOLED = -1  # stands for "all sites pooled" in Arm.nodes


@dataclass(frozen=True)
class Arm:
    """One model to train (or, with `members`, an ensemble of trained models to evaluate)."""

    name: str
    kind: str
    trained_on: str
    nodes: tuple[int, ...] = ()  # site indices, one node each (POOLED: one node holding every site)
    strategy: str = "fedavg"
    rounds: int = 1
    epochs: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    start_from: str = ""  # arm id whose final model is the starting point
    fold: int | None = None
    members: tuple[str, ...] = ()  # ensemble: arm ids whose probabilities are averaged
    evaluated: bool = True  # fold submodels are evaluated only inside their ensemble

    @property
    def id(self) -> str:
        return arm_id(self.name, self.trained_on)


SECURE_KINDS = frozenset({"federated", "leave-one-out"})  # arms that sum several sites' updates each round


def with_secure_aggregation(arm: Arm, requested: bool) -> bool:
    """Whether the arm runs with `[run] secure-aggregation`: the arms that sum several sites' updates
    (federated, leave-one-out, federated ensemble folds). Private, centralized and fine-tuned arms (one
    node) and cyclic arms (one site per round: its update is the next model) have no sum to hide."""
    return requested and arm.kind in SECURE_KINDS


def plan_arms(spec: ExperimentSpec) -> list[Arm]:
    """All arms of `spec` in run order (fine-tuning after its federated model, ensembles after their folds)."""
    rounds, epochs = spec.run_config().num_server_rounds, spec.run_config().local_epochs
    sites = tuple(range(spec.sites))
    first = spec.strategies[0]
    arms: list[Arm] = []
    if "private" in spec.arms:
        arms += [Arm("private", "private", f"site-{k}", (k,), rounds=rounds, epochs=epochs) for k in sites]
    if "centralized" in spec.arms:
        arms.append(Arm("centralized", "centralized", "pooled", (POOLED,), rounds=rounds, epochs=epochs))
    if "federated" in spec.arms:
        arms += [Arm(s, "federated", FEDERATION, sites, s, rounds, epochs) for s in spec.strategies]
    if "iil" in spec.arms:  # one visit per site, with the whole budget
        arms.append(
            Arm("iil", "cyclic", FEDERATION, sites, "cyclic", spec.sites, rounds * epochs, {"cyclic.cycles": 1})
        )
    if "ciil" in spec.arms:  # `rounds` cycles of one visit per site
        arms.append(
            Arm("ciil", "cyclic", FEDERATION, sites, "cyclic", rounds * spec.sites, epochs, {"cyclic.cycles": 0})
        )
    if "leave-one-out" in spec.arms:
        arms += [
            Arm(
                f"loo-{first}",
                "leave-one-out",
                f"without-site-{k}",
                tuple(s for s in sites if s != k),
                first,
                rounds,
                epochs,
            )
            for k in sites
        ]
    if spec.finetune_rounds:
        base = arm_id(first, FEDERATION)
        if "federated" not in spec.arms:
            arms.append(Arm(first, "federated", FEDERATION, sites, first, rounds, epochs))
        arms += [
            Arm(
                f"{first}-finetuned",
                "finetuned",
                f"site-{k}",
                (k,),
                rounds=spec.finetune_rounds,
                epochs=epochs,
                start_from=base,
            )
            for k in sites
        ]
    if spec.ensemble_folds:
        arms += _ensembles(spec, rounds, epochs)
    return arms + _privacy_sweep(spec, rounds, epochs)


def _privacy_sweep(spec: ExperimentSpec, rounds: int, epochs: float) -> list[Arm]:
    """One federated arm per noise level: DP-SGD at the sites (first strategy), then client-level dp-noised."""
    sites, first = tuple(range(spec.sites)), spec.strategies[0]
    arms = [
        Arm(
            f"{first}-dpsgd-z{z}",
            "federated",
            FEDERATION,
            sites,
            first,
            rounds,
            epochs,
            {"dp-sgd": True, "dp-noise-multiplier": z},
        )
        for z in spec.dp_sgd_noise_multipliers
    ]
    arms += [
        Arm(
            f"dp-noised-z{z}",
            "federated",
            FEDERATION,
            sites,
            "dp-noised",
            rounds,
            epochs,
            {"dp-noised.noise-multiplier": z},
        )
        for z in spec.dp_noised_noise_multipliers
    ]
    return arms


def _ensembles(spec: ExperimentSpec, rounds: int, epochs: float) -> list[Arm]:
    """For each ensembled arm: one submodel per fold, then the ensemble (probabilities averaged)."""
    k, sites = spec.ensemble_folds, tuple(range(spec.sites))
    bases: list[tuple[str, str, str, tuple[int, ...], str]] = []  # (name, kind, trained on, nodes, strategy)
    if "private" in spec.ensemble_arms:
        bases += [("private", "private", f"site-{s}", (s,), "fedavg") for s in sites]
    if "centralized" in spec.ensemble_arms:
        bases.append(("centralized", "centralized", "pooled", (POOLED,), "fedavg"))
    if "federated" in spec.ensemble_arms:
        first = spec.strategies[0]
        bases.append((first, "federated", FEDERATION, sites, first))
    arms = []
    for name, kind, trained_on, nodes, strategy in bases:
        folds = [
            Arm(f"{name}-fold{f}", kind, trained_on, nodes, strategy, rounds, epochs, fold=f, evaluated=False)
            for f in range(k)
        ]
        arms += folds
        arms.append(Arm(f"{name}-ens{k}", "ensemble", trained_on, members=tuple(a.id for a in folds)))
    return arms
