"""Test support, imported as `tests.support.<module>`:

- common: run train.py / torchrun in subprocesses on small synthetic data, read a run directory back;
- wandb_records: read an offline W&B run back from its .wandb files;
- fail_rank: train.py with one rank failing at a given step (run as a script, never imported);
- slow_train: train.py with a fixed sleep in every step, to interrupt a short run (run as a script);
- dist: start a real gloo process group of N processes in-process, for unit tests.
"""
