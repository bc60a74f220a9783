import logging
from collections import Counter

import pytest

# The local SLURM cluster fixture (started once per session, only by tests that ask for it).
pytest_plugins = ["tests.slurm.fixtures"]


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


# tests/run.sh runs the suite on two xdist workers. A work unit is a module, so that its module
# fixtures (shared training runs) are made once, except tests/slurm/, one unit: those tests share
# the one-node SLURM cluster, which one worker starts and stops. The units with the most slow tests
# go first, so that no long one is left to run alone at the end.
SLOW_WEIGHT = 30  # a slow test counts as about this many quick ones


@pytest.hookimpl(optionalhook=True)  # pytest without xdist still runs the suite, in one process
def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return "tests/slurm" if nodeid.startswith("tests/slurm/") else super()._split_scope(nodeid)

    return ModuleScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return  # not an xdist worker: keep the file order
    weight = Counter()
    for item in items:
        weight[item.module.__name__] += SLOW_WEIGHT if item.get_closest_marker("slow") else 1
    items.sort(key=lambda item: -weight[item.module.__name__])  # stable: a module keeps its own order
