# The local SLURM cluster fixture (started once per session, only by tests that ask for it).
pytest_plugins = ["tests.slurm.fixtures"]
