"""dist_cnn: distributed multi-GPU training of convolutional image classifiers."""

__version__ = "0.1.0"

from dist_cnn.api import fit  # noqa: E402  (the Python API: `from dist_cnn import fit`)

__all__ = ["fit", "__version__"]
