"""lungcad: lung nodule detection and malignancy estimation in chest CT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lungcad")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
