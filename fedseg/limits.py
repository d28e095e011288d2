"""Upper bounds on what fedseg loads and trains, shared by the checks of run configs, site data and model files."""

from __future__ import annotations

MAX_CHANNELS = 64  # image channels (modalities) of a volume or a model
MAX_NUM_CLASSES = 256  # classes incl. background: a label map holds class numbers 0..255
DEFAULT_MAX_VOXELS = 512**3  # voxels per channel a site loads unless it sets its own limit (fedseg.data.nifti_guard)
MAX_MANIFEST_BYTES = 64 * 2**20  # a site's dataset.json (10 000 subjects take about 2 MB)
MAX_CASES_BYTES = 256 * 2**20  # a results folder's cases.csv (a million test cases take about 150 MB)
MAX_RECORD_BYTES = 64 * 2**20  # a run's JSON records (history.json, arm.json; 128 rounds of 10 sites: about 3 MB)
MAX_PARAMETERS = 2**30  # a network's parameters: 4 GiB of float32 weights, beyond any 3D segmentation network in use
# the largest voxel spacing (mm) a run resamples to or a model file gives: past the thickest clinical slices
# (about 10 mm) the resampled grid of any body part is a handful of voxels, whose labels are no segmentation
MAX_SPACING_MM = 100.0
# the largest |voxel value| a scan may hold: past any scanner's range (CT ±3·10⁴ HU, PET ~10⁸ Bq/ml), and small
# enough that the squares intensity normalisation sums over a 512³ volume stay within float32
MAX_INTENSITY = 1e12
