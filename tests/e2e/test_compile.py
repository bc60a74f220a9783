"""--compile on the CPU: torch.compile (inductor, C++ codegen through the system compiler) trains the seed
model through train.py and lands where the eager run lands. Slow (the first compile takes tens of seconds
on 2 cores) but it runs in CI: the CUDA twin lives in tests/e2e/test_cuda.py."""

import shutil

import pytest

from tests.support.common import SMALL, read_events, read_summary, train

# 512 images / batch 64 = 8 steps an epoch; 2 epochs; the test set is one eval batch (one shape to compile)
ARGS = [
    *SMALL,
    "--synthetic-train-size",
    "512",
    "--synthetic-test-size",
    "256",
    "--epochs",
    "2",
    "--log-every",
    "4",
    "--eval-every",
    "0",
]


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(
    not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
    reason="torch.compile on the CPU needs a C++ compiler (g++/c++/clang++ on PATH)",
)
def test_compile_matches_eager(tmp_path):
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        p = train([*ARGS, *extra, "--out", out], check=0, timeout=280)
        runs[name] = (read_summary(out), [e["loss"] for e in read_events(out, "train")], p)
    (se, le, _), (sc, lc, pc) = runs["eager"], runs["compiled"]
    assert sc["steps"] == se["steps"] == 16 and sc["precision"] == se["precision"] == "fp32"
    assert len(lc) == len(le) == 4
    # Same init, same data order: only the kernels differ (fused, reordered float sums), so the losses
    # track each other closely; a compile that changed the maths would drift by far more.
    assert max(abs(a - b) for a, b in zip(lc, le)) < 0.05, (lc, le)
    assert lc[-1] < lc[0], lc  # and it learns
    assert abs(sc["test_accuracy"] - se["test_accuracy"]) < 0.05, (sc["test_accuracy"], se["test_accuracy"])
    assert "Traceback" not in pc.stderr
