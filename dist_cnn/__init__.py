"""dist_cnn: distributed multi-GPU training of convolutional image classifiers."""
__version__ = "0.1.0"


def __getattr__(name):
    # `from dist_cnn import fit` without importing torch for every `import dist_cnn`
    if name == "fit":
        from .api import fit
        return fit
    raise AttributeError(f"module 'dist_cnn' has no attribute {name!r}")
