"""fedseg: federated 3D medical image segmentation on Flower and MONAI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedseg")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+source"
