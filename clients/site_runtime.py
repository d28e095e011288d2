"""One site's training state inside a client process: config, trainer and cached datasets.

Built once per (run config, site) and reused across rounds while the process lives
(simulation keeps it; in deployment a fresh process rebuilds it from disk caches: the preprocessed
volumes persist in `<site state dir>/preprocessed`, keyed by pipeline, spacing and patch size, and
`<site state dir>/validated.json` remembers which unchanged scans passed the data checks).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import Context
from monai.data import Dataset

from fedseg.cache import cache_root
from fedseg.config import RunConfig
from fedseg.data.datalist import SiteDataError, SiteSplit
from fedseg.data.datasets import evaluation_dataset, prune_unused, training_dataset
from fedseg.data.sites import input_channels, load_site_split, site_dir_for
from fedseg.data.validate import check_site
from fedseg.model_spec import intensity_window, model_spec
from fedseg.optim import optimizer_factory
from fedseg.privacy import DPSettings, SitePrivacy, ledger_for
from fedseg.trainer import SegmentationTrainer

PREPROCESSED = "preprocessed"  # the site state dir's folder of cached preprocessed volumes
VALIDATED = "validated.json"  # the site state dir's memo of validated, unchanged scans


class ChannelMismatch(SiteDataError):
    """The site's images have another channel count than the global model takes."""

    def __init__(self, found: int, expected: int) -> None:
        public = (
            f"the site's images have {found} channel(s), the global model takes {expected} (run-config 'in-channels')"
        )
        super().__init__(public, public)


@dataclass
class SiteRuntime:
    """Everything a site needs to answer train and evaluate messages."""

    config: RunConfig
    site_id: int
    split: SiteSplit
    trainer: SegmentationTrainer
    train_set: Dataset
    val_set: Dataset
    test_set: Dataset

    def fit_seed(self, server_round: int) -> int:
        """Seed of one local fit: differs per site and round, fixed for a given run seed."""
        return self.config.seed * 1_000_003 + server_round * 1_009 + self.site_id

    def privacy_for(self, context: Context, run_key: str) -> SitePrivacy | None:
        """DP-SGD state of this site in run `run_key` (None without dp-sgd), its ledger in the site's state dir."""
        settings = DPSettings.from_config(self.config)
        if settings is None:
            return None
        return SitePrivacy(settings, ledger_for(site_state_dir(context), run_key))


def site_state_dir(context: Context) -> Path:
    """The site's own folder for state that must outlive a process (e.g. the privacy ledger).

    node_config 'state-dir' if given, else `<$FEDSEG_CACHE or ~/.cache/fedseg>/site-state/<site>`,
    where <site> is site-<id> in simulation or a hash of the node's data-dir in deployment.
    """
    node = context.node_config
    if "state-dir" in node:
        return Path(str(node["state-dir"])).expanduser()
    site_id, data_dir = site_of(context)
    return cache_root() / "site-state" / f"site-{site_id}" if data_dir is None else deployed_state_dir(data_dir)


def deployed_state_dir(data_dir: str) -> Path:
    """The default state folder of a deployed site whose node config names `data_dir`."""
    return cache_root() / "site-state" / ("site-" + hashlib.sha256(data_dir.encode()).hexdigest()[:12])


def site_of(context: Context) -> tuple[int, str | None]:
    """(site id, data dir) from node_config: partition-id in simulation, data-dir in deployment."""
    node = context.node_config
    if "data-dir" in node:
        return int(node.get("site-id", 0)), str(node["data-dir"])
    return int(node["partition-id"]), None


def runtime_for(context: Context, in_channels: int = 0) -> SiteRuntime:
    """The cached SiteRuntime of this context's run config and site, for a global model taking
    `in_channels` image channels (0: the run config's, or what this site's data has)."""
    site_id, data_dir = site_of(context)
    run_config = json.dumps(dict(context.run_config), sort_keys=True)
    return _build_runtime(run_config, site_id, data_dir, str(site_state_dir(context)), in_channels)


@lru_cache(maxsize=4)
def _build_runtime(
    run_config_json: str, site_id: int, data_dir: str | None, state_dir: str, in_channels: int
) -> SiteRuntime:
    config = RunConfig.from_mapping(json.loads(run_config_json))
    labels = config.labels
    site_dir = site_dir_for(config, site_id, data_dir)
    # a broken scan fails this site's reply, with reasons; unchanged scans are not read again
    report = check_site(site_dir, memo_file=Path(state_dir) / VALIDATED, label_values=labels.allowed_label_values)
    expected = in_channels or config.in_channels or (input_channels(config) if config.uses_synthetic_data else 0)
    if expected and report.channels != expected:
        raise ChannelMismatch(report.channels or 0, expected)
    cache_dir = Path(state_dir) / PREPROCESSED
    split = load_site_split(site_dir, seed=config.seed)
    spec, window = model_spec(config), intensity_window(config)  # a bundle's network_def and window, resolved
    torch.manual_seed(config.seed)  # identical initial weights everywhere; the server overwrites them anyway
    trainer = SegmentationTrainer(
        model_name=spec.name,
        model_args=spec.args,
        num_classes=config.num_classes,
        patch_size=config.patch_size,
        in_channels=expected or report.channels or 1,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        dp_compatible=config.dp_sgd,
        compile=config.torch_compile,
        precision=config.precision,
        num_workers=config.num_workers,
        labels=labels,
        optimizer=optimizer_factory(config.optimizer, config.weight_decay, config.momentum),
        sam_rho=config.sam_rho,
    )
    runtime = SiteRuntime(
        config=config,
        site_id=site_id,
        split=split,
        trainer=trainer,
        # DP-SGD's privacy unit is the subject: K patches per subject per draw, one gradient (fedseg.privacy)
        train_set=training_dataset(
            split.train,
            config.patch_size,
            config.spacing,
            cache_dir,
            samples_per_volume=config.dp_augmentation_multiplicity if config.dp_sgd else 2,
            label_mapping=labels.label_mapping,
            augmentation=config.augmentation,
            invert_probability=config.augmentation_invert,
            remap_probability=config.augmentation_remap,
            structure_probability=config.augmentation_structures,
            window=window,
        ),
        val_set=evaluation_dataset(split.val, config.spacing, cache_dir, labels.label_mapping, window),
        test_set=evaluation_dataset(split.test, config.spacing, cache_dir, labels.label_mapping, window),
    )
    prune_unused(cache_dir)  # the folders just opened are fresh; old grids' and patch sizes' go
    return runtime


def forget_runtimes() -> None:
    """Drop the cached runtimes: the next message validates the data (memo) and reopens it."""
    _build_runtime.cache_clear()
