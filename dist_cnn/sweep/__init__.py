"""Hyperparameter sweeps: an Optuna study whose every trial is a full dist_cnn run (torchrun or SLURM).

The driver (driver.py) asks the study for hyperparameters, writes them into each trial's config file
and launches the run (launch_local.py, launch_slurm.py); rank 0 of the run reports its evaluations
back to the study (reporter.py) so that the pruner can stop it. Everything a trial needs to resume
lives in files under the sweep directory, so a killed driver started again continues the same study.
"""
