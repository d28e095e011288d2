"""Where a site's data lives: synthetic sites in simulation, a data-dir in deployment."""

from __future__ import annotations

from pathlib import Path

from fedseg.config import RunConfig
from fedseg.data.datalist import SiteDataError, SiteSplit, load_datalist, split_datalist
from fedseg.data.synthetic import synthetic_root, write_site


def site_dir_for(config: RunConfig, site_index: int, node_data_dir: str | None = None) -> Path:
    """The folder of site `site_index`.

    A deployment node names its own folder (`node_data_dir`); in simulation the folder is
    `<data-dir>/site-<index>`, or a generated synthetic site when data-dir is "synthetic".
    """
    if node_data_dir:
        return Path(node_data_dir).expanduser()
    if config.uses_synthetic_data:
        root = synthetic_root(config.synthetic_subjects, config.synthetic_size, config.seed)
        return write_site(root, site_index, config.synthetic_subjects, config.synthetic_size, config.seed)
    site_dir = Path(config.data_dir).expanduser() / f"site-{site_index}"
    if not site_dir.is_dir():
        raise SiteDataError(f"{site_dir}: site folder not found (data-dir must hold site-0, site-1, ...)")
    return site_dir


def load_site_split(site_dir: Path, seed: int) -> SiteSplit:
    """Datalist of the site, split with the run's seed."""
    return split_datalist(load_datalist(site_dir), seed=seed)
