"""The local SLURM test cluster: cluster.sh, install.sh, helpers.py, fixtures.py (see README.md).

A package so that pytest does not put tests/slurm itself on sys.path (its helpers.py would
shadow any other top-level `helpers` module). Import as tests.slurm.helpers / tests.slurm.fixtures.
"""
