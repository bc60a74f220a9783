"""The exceptions the commands turn into one line: UserError (exit 2) and TrainingFailed (exit 1)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input from the user (flags, config, data, checkpoints): reported in one line, no traceback."""


class PeerError(UserError):
    """Rank 0's UserError, re-raised on the other ranks: rank 0 already reported it."""


class TrainingFailed(Exception):
    """The run could not go on (non-finite loss, failed checkpoint write): one line, exit code 1."""


class PeerFailed(TrainingFailed):
    """Rank 0's TrainingFailed, raised on the other ranks too: rank 0 already reported it."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message (at most `limit` characters), or its type."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]
