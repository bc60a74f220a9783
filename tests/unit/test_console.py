"""The console: the `dist_cnn` logger's levels per rank, --log-level, and plain lines on stdout."""

import logging

import pytest

from dist_cnn import config
from dist_cnn.observability import console


@pytest.fixture(autouse=True)
def fresh_logger():
    """Each test starts from an unconfigured `dist_cnn` logger and leaves the process's one as it was."""
    logger = logging.getLogger("dist_cnn")
    saved = logger.handlers[:], logger.level, logger.propagate
    logger.handlers[:], logger.level, logger.propagate = [], logging.NOTSET, True
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved


def emit_all(name="dist_cnn.train.trainer"):
    log = logging.getLogger(name)
    log.debug("a debug line")
    log.info("an info line")
    log.warning("warning: a warning line")


def test_rank0_prints_info_lines_alone_on_stdout(capsys):
    console.configure("INFO", rank=0, world_size=4)
    emit_all()
    out, err = capsys.readouterr()
    assert out == "an info line\nwarning: a warning line\n" and err == ""


def test_another_rank_drops_info_and_prefixes_its_warnings(capsys):
    console.configure("INFO", rank=2, world_size=4)
    emit_all()
    assert capsys.readouterr().out == "[rank 2] warning: a warning line\n"


@pytest.mark.parametrize(
    "flag, rank0, rank1",
    [
        ("DEBUG", ["a debug line", "an info line", "warning: a warning line"], ["warning: a warning line"]),
        ("WARNING", ["warning: a warning line"], ["warning: a warning line"]),
        ("ERROR", [], []),
    ],
)
def test_log_level_flag(capsys, flag, rank0, rank1):
    cfg = config.from_args(config.train_parser().parse_args(["--log-level", flag]))
    assert cfg.log.log_level == flag
    for rank, expected in ((0, rank0), (1, rank1)):
        console.configure(cfg.log.log_level, rank=rank, world_size=2)
        emit_all()
        prefix = f"[rank {rank}] " if rank else ""
        assert capsys.readouterr().out.splitlines() == [prefix + line for line in expected]


def test_log_level_is_an_option_with_choices():
    assert "--log-level" in config.train_parser().format_help()
    assert config.from_args(config.train_parser().parse_args([])).log.log_level == "INFO"
    with pytest.raises(Exception, match="invalid choice"):
        config.train_parser().parse_args(["--log-level", "LOUD"])


def test_the_launchers_rank_decides_when_none_is_given(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    console.configure()
    emit_all()
    assert capsys.readouterr().out == "[rank 1] warning: a warning line\n"


def test_an_applications_own_handler_is_kept_and_the_root_logger_untouched(capsys, fresh_logger):
    root = logging.getLogger()
    root_state = root.handlers[:], root.level
    seen = []

    class Mine(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    fresh_logger.addHandler(Mine())
    console.configure("INFO", rank=0, world_size=1)
    emit_all()
    assert seen == ["an info line", "warning: a warning line"] and capsys.readouterr().out == ""
    assert (root.handlers, root.level) == root_state
    assert not any(isinstance(h, console.ConsoleHandler) for h in fresh_logger.handlers)


def test_configuring_twice_keeps_one_handler(capsys):
    console.configure("INFO", rank=0, world_size=1)
    console.configure("DEBUG", rank=0, world_size=1)
    logging.getLogger("dist_cnn.data").debug("once")
    assert capsys.readouterr().out == "once\n"
