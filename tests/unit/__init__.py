"""Fast in-process unit tests: no subprocess runs of train.py, each file a few seconds."""
