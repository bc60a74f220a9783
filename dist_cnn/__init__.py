"""dist_cnn: distributed multi-GPU training of convolutional image classifiers."""
__version__ = "0.1.0"
