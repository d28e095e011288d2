"""Where a site's data lives: synthetic sites in simulation, a data-dir in deployment."""

from __future__ import annotations

from pathlib import Path

from fedseg.config import RunConfig
from fedseg.data.datalist import SiteDataError, SiteSplit, load_datalist
from fedseg.data.splits import load_or_make_split
from fedseg.data.synth import MAX_CLASSES, MIN_CLASSES, synthetic_root, write_site

SPLITS_FOLDER = "splits"


def site_dir_for(config: RunConfig, site_index: int, node_data_dir: str | None = None) -> Path:
    """The folder of site `site_index`.

    A deployment node names its own folder (`node_data_dir`); in simulation the folder is
    `<data-dir>/site-<index>` (as `fedseg synth` writes them), or a generated synthetic site
    when data-dir is "synthetic".
    """
    if node_data_dir:
        return Path(node_data_dir).expanduser()
    if config.uses_synthetic_data:
        if not MIN_CLASSES <= config.num_classes <= MAX_CLASSES:
            message = (
                f"data-dir 'synthetic' makes {MIN_CLASSES} to {MAX_CLASSES} classes, num-classes is {config.num_classes}"
            )
            raise SiteDataError(message, message)
        n, size, seed, classes = config.synthetic_subjects, config.synthetic_size, config.seed, config.num_classes
        return write_site(synthetic_root(n, size, seed, classes), site_index, n, size, seed, classes)
    site_dir = Path(config.data_dir).expanduser() / f"site-{site_index}"
    if not site_dir.is_dir():
        raise SiteDataError(f"{site_dir}: site folder not found (data-dir must hold site-0, site-1, ...)")
    return site_dir


def load_site_split(site_dir: Path, seed: int, split_dir: Path | None = None) -> SiteSplit:
    """Datalist of the site split with the run's seed; the split is saved in `<site>/splits/` (or `split_dir`)."""
    return load_or_make_split(load_datalist(site_dir), seed, split_dir or site_dir / SPLITS_FOLDER)
