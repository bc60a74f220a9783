import logging

import pytest

# The local SLURM cluster fixture (started once per session, only by tests that ask for it), and how
# tests/run.sh splits the suite between its two workers.
pytest_plugins = ["tests.slurm.fixtures", "tests.support.xdist_scheduling"]


@pytest.fixture
def logged():
    """The messages the `dist_cnn` loggers emit during the test, at every level, in order."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("dist_cnn")
    handler, level = Collect(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield messages
    logger.removeHandler(handler)
    logger.setLevel(level)
