"""The brain study's ten sites reshuffled IID: the same 70 subjects (each with its own scanner and
annotator), dealt at random to ten sites of the original sizes, so every site is a mix of institutions.

    python docs/experiments/brain-quick-cpu-64rounds-batch1-iid-control/make_iid.py \
        data/brain-quick-outside40 data/brain-quick-iid

Copies the subject folders (no links: a site refuses files outside its folder), writes each new site's
dataset.json (subject entries as in the source, keys of the first source site), and copies the outside
institution unchanged. Deterministic (numpy seed 0)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np


def main(source: Path, target: Path) -> None:
    sites = sorted(p for p in source.iterdir() if p.name.startswith("site-"))
    sizes, subjects = [], []
    for site in sites:
        entries = json.loads((site / "dataset.json").read_text())["training"]
        sizes.append(len(entries))
        subjects += [(site, e) for e in entries]
    order = np.random.default_rng(0).permutation(len(subjects))
    template = {k: v for k, v in json.loads((sites[0] / "dataset.json").read_text()).items() if k != "institution"}
    start = 0
    for k, size in enumerate(sizes):
        folder = target / f"site-{k}"
        folder.mkdir(parents=True)
        training = []
        for index in order[start : start + size]:
            site, entry = subjects[index]
            name = Path(entry["label"]).parent.name
            shutil.copytree(site / name, folder / name)
            training.append(entry)
        start += size
        meta = {
            **template,
            "name": f"iid-site-{k}",
            "description": "IID reshuffle of brain-quick-outside40",
            "numTraining": size,
            "training": training,
        }
        (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
        print(folder, size, sorted({Path(e["label"]).parent.name[0] for e in training}))
    shutil.copytree(source / "outside", target / "outside")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
