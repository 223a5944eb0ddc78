"""crystaloop: an active-learning DFT loop for inorganic crystals."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("crystaloop")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"

__all__ = ["__version__"]
