"""Where a site's data lives: synthetic sites in simulation, a data-dir in deployment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import nibabel as nib

from fedseg.config import ConfigError, RunConfig
from fedseg.data.datalist import SiteDataError, SiteSplit, Subject, load_datalist, scan_site
from fedseg.data.nifti_guard import nifti_image
from fedseg.data.splits import load_or_make_split
from fedseg.data.synth import MAX_CLASSES, MIN_CLASSES, synthetic_root, write_site

SPLITS_FOLDER = "splits"
SYNTHETIC_CHANNELS = {"pelvis": 1, "brain": 4}  # modalities fedseg synth writes per anatomy


def input_channels(config: RunConfig) -> int:
    """The run's image channels: `in-channels`, else what the data says (the synthetic anatomy's
    modalities, or the first subject of `<data-dir>/site-0`); 1 where this machine cannot see the
    data (a deployment's server): a site with other data then answers with a clear error."""
    if config.in_channels:
        return config.in_channels
    if config.uses_synthetic_data:
        return SYNTHETIC_CHANNELS[config.synthetic_anatomy]
    subjects = scan_site(Path(config.data_dir).expanduser() / "site-0").subjects
    if not subjects:
        return 1
    try:
        return subject_channels(subjects[0])
    except (OSError, ValueError, nib.filebasedimages.ImageFileError) as err:
        raise ConfigError(
            f"{subjects[0].images[0]}: cannot read its header to infer run-config 'in-channels' ({err}); set it"
        ) from None


def with_input_channels(config: RunConfig) -> RunConfig:
    """The config with `in-channels` resolved (see `input_channels`)."""
    return dataclasses.replace(config, in_channels=input_channels(config))


def subject_channels(subject: Subject) -> int:
    """Image channels of one subject from the file headers: one per modality file, or a 4D file's last axis."""
    shapes = [nifti_image(path).shape for path in subject.images]
    return sum(shape[3] if len(shape) == 4 else 1 for shape in shapes)


def site_dir_for(config: RunConfig, site_index: int, node_data_dir: str | None = None) -> Path:
    """The folder of site `site_index`.

    A deployment node names its own folder (`node_data_dir`); in simulation the folder is
    `<data-dir>/site-<index>` (as `fedseg synth` writes them), or a generated synthetic site
    when data-dir is "synthetic".
    """
    if node_data_dir:
        return Path(node_data_dir).expanduser()
    if config.uses_synthetic_data:
        anatomy = config.synthetic_anatomy
        if anatomy == "pelvis" and not MIN_CLASSES <= config.num_classes <= MAX_CLASSES:
            message = (
                f"data-dir 'synthetic' makes {MIN_CLASSES} to {MAX_CLASSES} classes, "
                f"num-classes is {config.num_classes}"
            )
            raise SiteDataError(message, message)
        n, size, seed, classes = config.synthetic_subjects, config.synthetic_size, config.seed, config.num_classes
        root = synthetic_root(n, size, seed, classes, anatomy=anatomy)
        return write_site(root, site_index, n, size, seed, classes, anatomy=anatomy)
    site_dir = Path(config.data_dir).expanduser() / f"site-{site_index}"
    if not site_dir.is_dir():
        raise SiteDataError(f"{site_dir}: site folder not found (data-dir must hold site-0, site-1, ...)")
    return site_dir


def load_site_split(site_dir: Path, seed: int, split_dir: Path | None = None) -> SiteSplit:
    """Datalist of the site split with the run's seed; the split is saved in `<site>/splits/` (or `split_dir`)."""
    return load_or_make_split(load_datalist(site_dir), seed, split_dir or site_dir / SPLITS_FOLDER)
