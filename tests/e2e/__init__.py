"""End-to-end runs: train.py, torchrun, accelerate and dist-cnn in subprocesses, on small data."""
