"""`dist-cnn predict` prepares a file as `dist-cnn eval` does: on a folder of non-square JPEGs, at
--image-size 32, 96 and 224, predict's top-1 for each test file equals eval's per-image prediction
(eval --predictions), with the default recipe and with resize + centre crop."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest
from PIL import Image

from dist_cnn import cli
from tests.support.common import train

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:Unable to enable fault handler")]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Two classes of non-square JPEGs, 120-300 px a side: every size resizes them."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(7)
    for split, n in (("train", 8), ("test", 8)):
        for i in range(n):
            c = i % 2
            w, h = int(rng.integers(120, 300)), int(rng.integers(120, 300))
            yy, xx = np.mgrid[0:h, 0:w]
            pattern = ((xx // (8 + 8 * c) + yy // 12) % 2)[..., None] * np.array([[[180, 40, 40], [40, 40, 180]][c]])
            pix = (pattern + rng.integers(0, 70, (h, w, 3))).clip(0, 255).astype(np.uint8)
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pix).save(d / f"{i:03d}.jpg", quality=90)
    return root


def rows(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))[1:]


@pytest.mark.parametrize(
    "size,recipe",
    [
        (32, ["--loader", "stream", "--eval-resize", "center-crop"]),  # floor(32 / 0.875) = 36, not round's 37
        (96, []),  # the default: stretched to the square size, whichever loader
        (224, ["--loader", "dataloader"]),
    ],
)
def test_predict_top1_equals_eval_per_image(photos, tmp_path, capsys, size, recipe):
    out = tmp_path / "run"
    common = ["--dataset", "imagefolder", "--data-dir", photos, "--image-size", size, "--batch-size", "8"]
    train(
        [*common, "--epochs", "1", "--precision", "fp32", "--workers", "0", "--wandb", "disabled", "--no-progress"]
        + ["--out", out, *recipe],
        check=0,
    )
    model = str(out / "model.pt")
    assert cli.main(["eval", "--checkpoint", model, "--predictions", str(tmp_path / "eval.csv")]) == 0
    capsys.readouterr()  # eval's report
    assert cli.main(["predict", "--model-file", model, str(photos / "test"), "--format", "csv", "--top-k", "1"]) == 0
    predicted = {os.path.realpath(r[0]): r[1] for r in rows(capsys.readouterr().out)}
    evaluated = {os.path.realpath(r[0]): r[2] for r in rows((tmp_path / "eval.csv").read_text())}
    assert len(evaluated) == 8 and evaluated == predicted
