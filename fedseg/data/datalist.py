"""A site's subjects: MSD layout (`dataset.json`) or plain `images/` + `labels/` folders.

`scan_site` lists subjects and collects layout faults (orphans, duplicates, missing files)
without stopping at the first; `load_datalist` returns MONAI datalist items or raises
`SiteDataError` naming every fault.

Plain folder layout: `images/<id>.nii.gz` (one modality) or `images/<id>_0000.nii.gz`,
`images/<id>_0001.nii.gz`, ... (one file per modality), and `labels/<id>.nii.gz`.

Every file must lie inside the site folder once paths and symbolic links are resolved (a manifest
path `../other/x.nii.gz`, an absolute path or a link elsewhere is an `outside-site` error), unless
the site allows it explicitly: `allow_outside=True`, or a file named `allow-outside-data` in the
site folder (its operator's statement; fedseg's own data views carry one).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedseg.limits import MAX_MANIFEST_BYTES

Datalist = list[dict]
NIFTI_SUFFIXES = (".nii.gz", ".nii")
_MODALITY = re.compile(r"^(?P<id>.+)_(?P<channel>\d{4})$")
ALLOW_OUTSIDE_FILE = "allow-outside-data"  # in a site folder: its files may live elsewhere (links, manifest paths)


def file_stamps(paths: Iterable[str | Path]) -> list[list]:
    """[path, size, modification time in ns] per file: any edit or replacement changes it
    (the key of cached preprocessing and of remembered validation results); OSError if missing."""
    stamps = []
    for path in paths:
        stat = Path(path).stat()
        stamps.append([str(path), stat.st_size, stat.st_mtime_ns])
    return stamps


class SiteDataError(ValueError):
    """A site's data folder cannot be used; the message names the file and the fault.

    `public` says what is wrong without paths or subject ids: it may leave the site (error replies).
    """

    def __init__(self, message: str, public: str | None = None) -> None:
        super().__init__(message)
        self.public = public or "site data unusable (details in the site's log)"


@dataclass(frozen=True)
class Problem:
    """One fault of a site's data: severity ("error" or "warning"), kind code, file, description."""

    severity: str
    kind: str
    file: str
    fault: str

    def __str__(self) -> str:
        return f"{self.file}: {self.fault}"


def public_summary(problems: list[Problem]) -> str:
    """Counts of each kind of error, with no paths or ids (safe to send from the site)."""
    kinds = Counter(p.kind for p in problems if p.severity == "error")
    return "site data invalid: " + ", ".join(f"{n} x {kind}" for kind, n in sorted(kinds.items()))


@dataclass(frozen=True)
class SiteSplit:
    """Datalist items of a site, split for training, validation during training, and testing."""

    train: Datalist
    val: Datalist
    test: Datalist


@dataclass(frozen=True)
class Subject:
    """One labelled subject: its id, image file(s) (one per modality, or one 4D file) and label."""

    subject_id: str
    images: tuple[Path, ...]
    label: Path

    def as_item(self) -> dict:
        """MONAI datalist item: "image" is a path, or a list of paths for several modalities."""
        image: str | list[str] = str(self.images[0]) if len(self.images) == 1 else [str(p) for p in self.images]
        return {"image": image, "label": str(self.label), "subject": self.subject_id}


@dataclass
class SiteListing:
    """What a site folder holds, plus the layout faults found while listing it."""

    site_dir: Path
    layout: str
    allow_outside: bool = False  # files may resolve outside site_dir
    subjects: list[Subject] = field(default_factory=list)
    errors: list[Problem] = field(default_factory=list)
    declared_classes: int | None = None  # from dataset.json "labels", when present
    declared_values: tuple[int, ...] = ()  # the integer keys of dataset.json "labels" (BraTS: 0, 1, 2, 4)

    def error(self, kind: str, file: str | Path, fault: str) -> None:
        """Record a layout fault."""
        self.errors.append(Problem("error", kind, str(file), fault))


def subject_id_of(path: str | Path) -> str:
    """File name without the NIfTI suffix (and without a `_0000` modality suffix)."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    match = _MODALITY.match(name)
    return match.group("id") if match else name


def scan_site(site_dir: str | Path, allow_outside: bool | None = None) -> SiteListing:
    """List a site's subjects in either layout, collecting every layout fault. `allow_outside`:
    files may resolve outside the site folder (None: only when the folder holds ALLOW_OUTSIDE_FILE)."""
    site_dir = Path(site_dir)
    if not site_dir.is_dir():
        listing = SiteListing(site_dir, layout="missing")
        listing.error("not-a-site", site_dir, "site folder not found")
        return listing
    if allow_outside is None:
        allow_outside = (site_dir / ALLOW_OUTSIDE_FILE).exists()
    if (site_dir / "dataset.json").is_file():
        return _scan_decathlon(site_dir, allow_outside)
    if (site_dir / "images").is_dir() or (site_dir / "labels").is_dir():
        return _scan_folders(site_dir, allow_outside)
    listing = SiteListing(site_dir, layout="unknown")
    listing.error("not-a-site", site_dir, "no dataset.json and no images/ + labels/ folders: not a site folder")
    return listing


def load_datalist(site_dir: str | Path, allow_outside: bool | None = None) -> Datalist:
    """Labelled subjects of a site as MONAI datalist items; raise SiteDataError on any layout fault."""
    listing = scan_site(site_dir, allow_outside)
    if listing.errors:
        raise SiteDataError("; ".join(map(str, listing.errors)), public_summary(listing.errors))
    if not listing.subjects:
        raise SiteDataError(f"{listing.site_dir}: no labelled subjects found", "site data invalid: no subjects")
    return [subject.as_item() for subject in listing.subjects]


def _scan_decathlon(site_dir: Path, allow_outside: bool = False) -> SiteListing:
    manifest = site_dir / "dataset.json"
    listing = SiteListing(site_dir, layout="decathlon", allow_outside=allow_outside)
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValueError(f"larger than the {MAX_MANIFEST_BYTES // 2**20} MiB a dataset.json may have")
        meta = json.loads(manifest.read_bytes())
    except (OSError, ValueError, RecursionError) as err:
        listing.error("manifest", manifest, f"cannot read the 'training' list: {err}")
        return listing
    items = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(items, list):
        listing.error(
            "manifest",
            manifest,
            "cannot read the 'training' list: a JSON object with a 'training' list of "
            f"entries is needed, got {_kind(items if isinstance(meta, dict) else meta)}",
        )
        return listing
    labels = meta.get("labels")
    if isinstance(labels, dict) and labels:
        listing.declared_classes = len(labels)
        keys = [key for key in labels if isinstance(key, str) and key.strip().isdigit()]
        listing.declared_values = tuple(sorted(int(key) for key in keys)) if len(keys) == len(labels) else ()
    candidates = []
    for index, item in enumerate(items):
        entry = _manifest_entry(listing, manifest, index, item)
        if entry is None:
            continue
        images, label = entry
        if label is None:
            listing.error("image-without-label", images[0], "image without label (training entry has no 'label')")
            continue
        candidates.append((manifest_subject_id(item, [str(p) for p in images]), images, label))
    _collect_subjects(listing, candidates)
    listed = {_same_file_key(label) for _, _, label in candidates}
    images_listed = {_same_file_key(path) for _, paths, _ in candidates for path in paths}
    for folder in sorted({label.parent for _, _, label in candidates}):
        for path in _nifti_files(folder):
            if _same_file_key(path) not in listed | images_listed:
                listing.error("label-without-image", path, "label without image (not listed in dataset.json)")
    return listing


def manifest_subject_id(item: dict, images: list[str]) -> str:
    """A dataset.json entry's subject id: its "id" or "subject" when given, else the part the image
    file names share (`BraTS_001_t1`, `BraTS_001_flair` → `BraTS_001`), else the image's name."""
    for key in ("id", "subject"):
        if isinstance(item.get(key), str) and item[key]:
            return item[key]
    stems = [subject_id_of(path) for path in images]
    if len(set(stems)) <= 1:
        return stems[0]
    shared = os.path.commonprefix(stems)  # noqa: RUF071 - the shared start of file-name stems, by character
    trimmed = re.sub(r"[^A-Za-z0-9]*$", "", shared if shared[-1:] in "_-." else re.sub(r"[_\-.][^_\-.]*$", "", shared))
    return trimmed or stems[0]


def _manifest_entry(
    listing: SiteListing, manifest: Path, index: int, item: object
) -> tuple[list[Path], Path | None] | None:
    """The image files and label file (None: not given) of training entry `index`, as paths joined to
    the site folder (MONAI's rule); None, with a `manifest` error, when the entry is malformed."""
    if not isinstance(item, dict):
        listing.error("manifest", manifest, f"training entry {index} must be an object, got {_kind(item)}")
        return None
    images, label = item.get("image"), item.get("label")
    images = [images] if isinstance(images, str) else images
    if not images:
        listing.error("manifest", manifest, f"training entry {index} has no 'image'")
        return None
    if not isinstance(images, list) or not all(_path_text(p) for p in images):
        listing.error("manifest", manifest, f"training entry {index}: 'image' must be a file path or a list of them")
        return None
    if label in (None, ""):
        return [_joined(listing.site_dir, p) for p in images], None
    if not _path_text(label):
        listing.error("manifest", manifest, f"training entry {index}: 'label' must be a file path, got {_kind(label)}")
        return None
    for key in ("id", "subject"):
        if key in item and not isinstance(item[key], str):
            listing.error(
                "manifest", manifest, f"training entry {index}: '{key}' must be a string, got {_kind(item[key])}"
            )
            return None
    return [_joined(listing.site_dir, p) for p in images], _joined(listing.site_dir, label)


def _path_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip()) and "\0" not in value


def _joined(site_dir: Path, path: str) -> Path:
    return Path(os.path.normpath(os.path.join(site_dir, path)))


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _same_file_key(path: Path) -> str:
    """Compare listed and found files by their resolved path (`./a/b` and `a/b` are one file)."""
    return str(path.resolve())


def _scan_folders(site_dir: Path, allow_outside: bool = False) -> SiteListing:
    listing = SiteListing(site_dir, layout="folders", allow_outside=allow_outside)
    images: dict[str, list[Path]] = defaultdict(list)
    for path in _nifti_files(site_dir / "images"):
        images[subject_id_of(path)].append(path)
    labels: dict[str, list[Path]] = defaultdict(list)
    for path in _nifti_files(site_dir / "labels"):
        labels[subject_id_of(path)].append(path)
    candidates = []
    for sid in sorted(set(images) | set(labels)):
        if sid not in labels:
            listing.error("image-without-label", images[sid][0], "image without label (no labels/ file with this id)")
        elif sid not in images:
            listing.error("label-without-image", labels[sid][0], "label without image (no images/ file with this id)")
        else:
            for extra in labels[sid][1:]:
                listing.error("duplicate-id", extra, f"duplicate subject id '{sid}' (several label files)")
            candidates.append((sid, _unique_modalities(listing, sid, images[sid]), labels[sid][0]))
    _collect_subjects(listing, candidates)
    return listing


def _unique_modalities(listing: SiteListing, sid: str, paths: list[Path]) -> list[Path]:
    """Keep one file per modality; report `case.nii` next to `case.nii.gz` as a duplicate."""
    seen: dict[str, Path] = {}
    for path in sorted(paths):
        key = path.name.split(".nii")[0]
        if key in seen:
            listing.error("duplicate-id", path, f"duplicate subject id '{sid}' (also {seen[key].name})")
        else:
            seen[key] = path
    return list(seen.values())


def _collect_subjects(listing: SiteListing, candidates: list[tuple[str, list[Path], Path]]) -> None:
    """Add subjects, reporting missing files and duplicate ids."""
    seen: set[str] = set()
    root = listing.site_dir.resolve()
    for sid, images, label in candidates:
        if sid in seen:
            listing.error("duplicate-id", images[0], f"duplicate subject id '{sid}'")
            continue
        seen.add(sid)
        outside = [] if listing.allow_outside else [p for p in (*images, label) if not _inside(p, root)]
        for path in outside:
            listing.error(
                "outside-site",
                path,
                "resolves outside the site folder (links and paths must stay inside "
                f"it, or the site folder must hold a file '{ALLOW_OUTSIDE_FILE}')",
            )
        missing = [p for p in (*images, label) if not p.is_file()]
        for path in missing:
            listing.error("missing-file", path, "file not found")
        if not missing and not outside:
            listing.subjects.append(Subject(sid, tuple(images), label))


def _inside(path: Path, root: Path) -> bool:
    """Whether `path`, links resolved, lies in `root` (a link loop counts as outside)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _nifti_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(NIFTI_SUFFIXES))
