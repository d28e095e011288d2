"""Would keeping only the largest connected tumour component close the brain internal gap? (offline)

nnU-Net's post-processing (Isensee et al. 2021) removes every predicted tumour component but the largest
when that helps on validation. For each batch-1 seed this loads Ditto's global model, each site's personal
model (mixed with the stored per-region weights) and the centralized model, each with its own stored
enhancing-tumour threshold, and scores every internal validation and test scan three ways: as stored,
with the whole tumour reduced to its largest component (`wt`), and additionally the tumour core reduced to
its largest component inside it (`wt+tc`, removed core becomes edema). It prints the test Dice of each
model under each variant against the centralized model as stored, and the variant each federation would
pick on its sites' validation scans (unweighted mean over the sites, ties to none).

    PYTHONPATH=. python docs/experiments/brain-quick-cpu-64rounds-batch1-largest-component/largest_component.py \
        configs/experiment-brain-quick-cpu-64rounds-batch1-{pilot,pilot-seed1,seed2,...,seed11}.toml
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import torch
from monai.data import DataLoader
from scipy import ndimage
from scipy.stats import wilcoxon

from clients.personal import PersonalState
from fedseg.experiments.evaluation import _test_set
from fedseg.experiments.spec import ExperimentSpec
from fedseg.experiments.views import load_splits
from fedseg.federation import run_key
from fedseg.labels import LabelScheme
from fedseg.model_checkpoint import ModelCheckpoint

VARIANTS = ("none", "wt", "wt+tc")
MODELS = ("central", "global", "mean")
CORE, EDEMA = 1, 2


def largest(mask: np.ndarray) -> np.ndarray:
    parts, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, parts, index=range(1, count + 1))
    return parts == 1 + int(np.argmax(sizes))


def variant(label: np.ndarray, name: str) -> np.ndarray:
    out = label.copy()
    if name == "none":
        return out
    tumour = out > 0
    out[tumour & ~largest(tumour)] = 0
    if name == "wt+tc":
        core = (out == CORE) | (out == 3)
        out[core & ~largest(core)] = EDEMA
    return out


def scores(labels: LabelScheme, probabilities: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """(variants, 3): WT/TC/ET Dice of one scan under each variant."""
    stored = labels.label_map(probabilities)[0, 0].numpy()
    rows = []
    for name in VARIANTS:
        label = torch.as_tensor(variant(stored, name))[None, None]
        predicted = labels.masks(label)
        expected = labels.masks(truth)
        inter = (predicted & expected).flatten(2).sum(2).float()
        total = (predicted.flatten(2).sum(2) + expected.flatten(2).sum(2)).float()
        dice = torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total))
        rows.append(dice[0].numpy())
    return np.stack(rows)


def seed_scores(config: str) -> tuple[str, dict[str, list[np.ndarray]], dict[str, np.ndarray]]:
    """Per model: the validation scores of each site (scans, variants, 3) and the test scores of all sites."""
    spec = ExperimentSpec.from_toml(config)
    results = spec.results_dir.resolve()
    splits = load_splits([spec.site_dir(k) for k in range(spec.sites)], spec.run_config().seed)
    shared = ModelCheckpoint.load(results / "arms/ditto--federation/model.pt")
    central = ModelCheckpoint.load(results / "arms/centralized--pooled/model.pt")
    assert shared.personal_weight is not None
    weight = torch.tensor(shared.personal_weight).view(1, -1, 1, 1, 1)
    key = run_key(results / "arms/ditto--federation")
    val: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    test: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    for k in range(spec.sites):
        own = PersonalState(results / "site-state" / spec.site_dir(k).name, key).personal_model(shared.state_dict)
        g, p, c = shared.trainer(), dataclasses.replace(shared, state_dict=own).trainer(), central.trainer()
        for part, out in (("val", val), ("test", test)):
            items = getattr(splits[k], part)
            if not items:
                continue
            per_model: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
            for batch in DataLoader(_test_set(spec, f"site-{k}", False, items).dataset):
                prob_g = shared.labels.probabilities(g.predict_logits(batch["image"])).cpu()
                prob_p = shared.labels.probabilities(p.predict_logits(batch["image"])).cpu()
                prob_c = central.labels.probabilities(c.predict_logits(batch["image"])).cpu()
                per_model["central"].append(scores(central.labels, prob_c, batch["label"]))
                per_model["global"].append(scores(shared.labels, prob_g, batch["label"]))
                per_model["mean"].append(scores(shared.labels, weight * prob_p + (1 - weight) * prob_g, batch["label"]))
            for m in MODELS:
                out[m].append(np.stack(per_model[m]))
    return spec.name, val, {m: np.concatenate(test[m]) for m in MODELS}


def main(configs: list[str]) -> None:
    seeds = []
    for config in configs:
        seeds.append(seed_scores(config))
        print(f"scored {seeds[-1][0]}", file=sys.stderr, flush=True)
    reference = np.concatenate([t["central"][:, 0].mean(1) for _, _, t in seeds])
    ratio_ref = [t["central"][:, 0].mean() for _, _, t in seeds]
    print(f"{len(seeds)} seeds, {len(reference)} internal test scan-runs; against the centralized model as stored\n")
    print("| model | variant | WT / TC / ET | % of centralized (mean of seed ratios) | per scan | Wilcoxon P |")
    print("|---|---|---|---|---|---|")
    for m in MODELS:
        for v, name in enumerate(VARIANTS):
            per_scan = np.concatenate([t[m][:, v] for _, _, t in seeds])
            score = per_scan.mean(1)
            ratio = np.mean([t[m][:, v].mean() / r for (_, _, t), r in zip(seeds, ratio_ref, strict=True)])
            diff = score - reference
            p = wilcoxon(diff).pvalue if np.any(diff) else 1.0
            parts = " / ".join(f"{x:.3f}" for x in per_scan.mean(0))
            print(f"| {m} | {name} | {parts} | {100 * ratio:.1f} % | {diff.mean():+.4f} | {p:.2g} |")
    print("\nvariant chosen on validation (unweighted mean over sites; ties to the first):")
    for m in MODELS:
        chosen, picked = [], []
        for _, val, t in seeds:
            by_site = np.stack([site.mean(2).mean(0) for site in val[m]])  # (sites, variants)
            v = int(np.argmax(by_site.mean(0)))
            chosen.append(VARIANTS[v])
            picked.append(t[m][:, v].mean(1))
        score = np.concatenate(picked)
        ratio = np.mean([s.mean() / r for s, r in zip(picked, ratio_ref, strict=True)])
        diff = score - reference
        p = wilcoxon(diff).pvalue if np.any(diff) else 1.0
        print(f"- {m}: {', '.join(chosen)} -> {100 * ratio:.1f} % ({diff.mean():+.4f} per scan, P {p:.2g})")


if __name__ == "__main__":
    main(sys.argv[1:])
