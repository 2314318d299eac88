"""tfmerge: merge frozen TensorFlow graphs into one verified SavedModel and publish it."""

from importlib import metadata

try:
    __version__ = metadata.version("tfmerge")
except metadata.PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
