"""How much of the brain internal gap better choices could close: Ditto's personal weights and the ET threshold.

For each batch-1 seed it loads the Ditto arm's global model, each site's personal model and the centralized
model from the run folder, scores every internal validation and test scan at every personal weight per region
(fedseg.personal_mix.CANDIDATES, 125 combinations) and every ET threshold (fedseg.enhancing.CANDIDATES), and
prints each rule's test Dice against the centralized model: the federation's choice (what the study
reports), test-set oracles (one choice per federation, the best possible), the threshold chosen on the mean
instead of the global model, a joint choice on validation, and fixed weights chosen on seeds 0-5.

    PYTHONPATH=. python docs/experiments/brain-quick-cpu-64rounds-batch1-choice-oracle/choice_oracle.py \
        configs/experiment-brain-quick-cpu-64rounds-batch1-{pilot,pilot-seed1,seed2,...,seed11}.toml

(the run folders of those configs under results/ must exist; about 2 minutes per seed on one core)
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
from collections.abc import Callable

import numpy as np
import torch
from monai.data import DataLoader
from scipy.stats import wilcoxon

from clients.personal import PersonalState
from fedseg.enhancing import CANDIDATES as THRESHOLDS
from fedseg.enhancing import enhancing_dice_by_candidate
from fedseg.experiments.evaluation import _test_set
from fedseg.experiments.spec import ExperimentSpec
from fedseg.experiments.views import load_splits
from fedseg.federation import run_key
from fedseg.labels import LabelScheme
from fedseg.model_checkpoint import ModelCheckpoint
from fedseg.personal_mix import CANDIDATES as WEIGHTS

COMBOS = list(itertools.product(range(len(WEIGHTS)), repeat=3))  # personal weight index for WT, TC, ET


@dataclasses.dataclass
class Scans:
    """Per scan: WT and TC Dice of the mean at each weight combination, ET at each combination and threshold,
    and the centralized model's."""

    mean_wt_tc: np.ndarray  # (scans, combos, 2)
    mean_et: np.ndarray  # (scans, combos, thresholds)
    central_wt_tc: np.ndarray  # (scans, 2)
    central_et: np.ndarray  # (scans, thresholds)

    def mean_score(self, combo: int, threshold: int) -> np.ndarray:
        return (self.mean_wt_tc[:, combo].sum(1) + self.mean_et[:, combo, threshold]) / 3

    def central_score(self, threshold: int) -> np.ndarray:
        return (self.central_wt_tc.sum(1) + self.central_et[:, threshold]) / 3

    def table(self) -> np.ndarray:
        """(combos, thresholds): the mean over the scans of each choice's score."""
        return (self.mean_wt_tc.sum(2).mean(0)[:, None] + self.mean_et.mean(0)) / 3


@dataclasses.dataclass
class Seed:
    name: str
    chosen: tuple[int, int]  # (combo, threshold) the federation stored with its model
    central_threshold: int
    val_by_site: list[Scans]
    test: Scans


def score(loader: DataLoader, labels: LabelScheme, models: dict[str, torch.nn.Module | None]) -> Scans:
    rows: list[tuple[np.ndarray, ...]] = []
    for batch in loader:
        prob = {k: labels.probabilities(t.predict_logits(batch["image"])).cpu() for k, t in models.items() if t}
        truth = batch["label"]
        wt_tc = np.full((len(COMBOS), 2), np.nan)
        et = np.full((len(COMBOS), len(THRESHOLDS)), np.nan)
        for i, combo in enumerate(COMBOS):
            w = torch.tensor([WEIGHTS[j] for j in combo]).view(1, 3, 1, 1, 1)
            mean = w * prob["personal"] + (1 - w) * prob["global"]
            wt_tc[i] = labels.dice(mean, truth)[0, :2].numpy()
            et[i] = enhancing_dice_by_candidate(labels, mean, truth)[0]
        central = prob["central"]
        rows.append(
            (
                wt_tc,
                et,
                labels.dice(central, truth)[0, :2].numpy(),
                enhancing_dice_by_candidate(labels, central, truth)[0],
            )
        )
    return Scans(*(np.stack([r[i] for r in rows]) for i in range(4)))


def load_seed(config: str) -> Seed:
    spec = ExperimentSpec.from_toml(config)
    results = spec.results_dir.resolve()
    splits = load_splits([spec.site_dir(k) for k in range(spec.sites)], spec.run_config().seed)
    shared = ModelCheckpoint.load(results / "arms/ditto--federation/model.pt")
    central = ModelCheckpoint.load(results / "arms/centralized--pooled/model.pt")
    labels = dataclasses.replace(shared.labels, enhancing_min_voxels=0)
    key = run_key(results / "arms/ditto--federation")
    val, test = [], []
    for k in range(spec.sites):
        own = PersonalState(results / "site-state" / spec.site_dir(k).name, key).personal_model(shared.state_dict)
        models = {
            "global": shared.trainer(),
            "personal": dataclasses.replace(shared, state_dict=own).trainer(),
            "central": central.trainer(),
        }
        for part, out in (("val", val), ("test", test)):
            items = getattr(splits[k], part)
            if items:
                out.append(score(DataLoader(_test_set(spec, f"site-{k}", False, items).dataset), labels, models))
    assert shared.personal_weight is not None
    chosen = (
        COMBOS.index(tuple(WEIGHTS.index(w) for w in shared.personal_weight)),
        THRESHOLDS.index(shared.labels.enhancing_min_voxels),
    )
    merged = Scans(*(np.concatenate([getattr(s, f.name) for s in test]) for f in dataclasses.fields(Scans)))
    return Seed(spec.name, chosen, THRESHOLDS.index(central.labels.enhancing_min_voxels), val, merged)


Rule = Callable[[Seed], np.ndarray]


def rules() -> dict[str, Rule]:
    def chosen(s: Seed) -> np.ndarray:
        return s.test.mean_score(*s.chosen)

    def oracle(s: Seed) -> np.ndarray:
        return s.test.mean_score(*np.unravel_index(int(np.argmax(s.test.table())), s.test.table().shape))

    def oracle_threshold(s: Seed) -> np.ndarray:
        return s.test.mean_score(s.chosen[0], int(np.argmax(s.test.table()[s.chosen[0]])))

    def oracle_weights(s: Seed) -> np.ndarray:
        return s.test.mean_score(int(np.argmax(s.test.table()[:, s.chosen[1]])), s.chosen[1])

    def val_table(s: Seed) -> np.ndarray:  # each site counts once, as the federation's choices
        return np.mean([site.table() for site in s.val_by_site], axis=0)

    def threshold_on_mean(s: Seed) -> np.ndarray:
        return s.test.mean_score(s.chosen[0], int(np.argmax(val_table(s)[s.chosen[0]])))

    def joint_on_validation(s: Seed) -> np.ndarray:
        table = val_table(s)
        return s.test.mean_score(*np.unravel_index(int(np.argmax(table)), table.shape))

    return {
        "the federation's choice (as reported)": chosen,
        "oracle: weights and threshold best on the test scans": oracle,
        "oracle threshold, chosen weights": oracle_threshold,
        "oracle weights, chosen threshold": oracle_weights,
        "threshold chosen on the mean's validation Dice": threshold_on_mean,
        "weights and threshold chosen jointly on validation": joint_on_validation,
    }


def compare(seeds: list[Seed], rule: Rule, reference: Rule) -> str:
    ratio = np.mean([rule(s).mean() / reference(s).mean() for s in seeds])
    diff = np.concatenate([rule(s) - reference(s) for s in seeds])
    p = wilcoxon(diff).pvalue if np.any(diff) else 1.0
    return f"{100 * ratio:5.1f} % ({diff.mean():+.4f} per scan, Wilcoxon P {p:.2g})"


def main(configs: list[str]) -> None:
    seeds = []
    for config in configs:
        seeds.append(load_seed(config))
        print(f"scored {seeds[-1].name}", file=sys.stderr, flush=True)

    def central(s: Seed) -> np.ndarray:
        return s.test.central_score(s.central_threshold)

    def central_oracle(s: Seed) -> np.ndarray:
        return s.test.central_score(int(np.argmax(s.test.central_et.mean(0))))

    print(f"{len(seeds)} seeds, {sum(len(s.test.central_et) for s in seeds)} internal test scan-runs")
    print("| rule | vs centralized (its chosen threshold) | vs centralized with its oracle threshold |")
    print("|---|---|---|")
    for name, rule in {**rules(), "centralized, oracle threshold": central_oracle}.items():
        print(f"| {name} | {compare(seeds, rule, central)} | {compare(seeds, rule, central_oracle)} |")
    print("\nper region over the scan-runs (WT / TC / ET): ")
    for name, pick in (
        ("federation's choice", lambda s: s.chosen),
        ("oracle", lambda s: np.unravel_index(int(np.argmax(s.test.table())), s.test.table().shape)),
    ):
        parts = np.concatenate(
            [np.c_[s.test.mean_wt_tc[:, pick(s)[0]], s.test.mean_et[:, pick(s)[0], pick(s)[1]]] for s in seeds]
        )
        print(f"- Ditto's mean, {name}: {' / '.join(f'{v:.3f}' for v in parts.mean(0))}")
    for name, pick in (
        ("its threshold", lambda s: s.central_threshold),
        ("oracle threshold", lambda s: int(np.argmax(s.test.central_et.mean(0)))),
    ):
        parts = np.concatenate([np.c_[s.test.central_wt_tc, s.test.central_et[:, pick(s)]] for s in seeds])
        print(f"- centralized, {name}: {' / '.join(f'{v:.3f}' for v in parts.mean(0))}")
    half = len(seeds) // 2
    print(f"\nfixed weights (federation's threshold), chosen on the first {half} seeds, tested on the rest:")
    fixed = {
        c: [s.test.mean_score(c, s.chosen[1]).mean() / central(s).mean() for s in seeds] for c in range(len(COMBOS))
    }
    best = max(fixed, key=lambda c: np.mean(fixed[c][:half]))
    label = tuple(WEIGHTS[j] for j in COMBOS[best])
    mine = [rules()["the federation's choice (as reported)"](s).mean() / central(s).mean() for s in seeds]
    for name, ratios in ((f"best fixed {label}", fixed[best]), ("the federation's choice", mine)):
        first, rest = 100 * np.mean(ratios[:half]), 100 * np.mean(ratios[half:])
        print(f"- {name}: {first:.1f} % on the first, {rest:.1f} % on the rest")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main(sys.argv[1:])
