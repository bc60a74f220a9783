"""Reliability end to end: real runs in subprocesses (bad values, run-directory locks, resume rules,
write failures, signals, launch scripts)."""
from __future__ import annotations

import pytest

from common import SMALL, train


@pytest.mark.parametrize("args,needle", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--timeout", "inf"], "--timeout must be a finite number"),
    (["--log-every", "0"], "--log-every must be positive"),
    (["--synthetic-test-size", "0"], "--synthetic-test-size must be positive"),
    (["--image-size", "-4"], "--image-size must be in [4, 1024]"),
    (["--checkpoint-every-minutes", "nan"], "--checkpoint-every-minutes must be a finite number"),
])
def test_bad_values_in_a_real_process(tmp_path, args, needle):
    p = train([*SMALL, "--out", tmp_path / "run", *args])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "run").exists()
