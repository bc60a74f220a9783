"""The loader never changes results: the default recipe on one folder of non-square JPEGs through
--loader device, dataloader and stream trains to the same weights and the same test accuracy."""

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.common import read_summary, train

pytestmark = pytest.mark.slow


def test_every_loader_trains_the_same_model(tmp_path):
    rng = np.random.default_rng(3)
    for split, n in (("train", 48), ("test", 20)):
        for i in range(n):
            c = i % 2
            h, w = (int(v) for v in rng.integers(20, 44, 2))
            pix = rng.integers(0, 150, (h, w, 3)) + 100 * np.eye(3, dtype=np.int64)[c]
            d = tmp_path / "imgs" / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pix.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.jpg", quality=90)
    common = ["--dataset", "imagefolder", "--data-dir", tmp_path / "imgs", "--image-size", "24", "--batch-size", "16"]
    common += ["--epochs", "2", "--precision", "fp32", "--workers", "1", "--flip", "--crop-padding", "2"]
    common += ["--wandb", "disabled", "--no-progress"]
    runs = {}
    for loader in ("device", "dataloader", "stream"):
        train([*common, "--loader", loader, "--out", tmp_path / loader], check=0)
        runs[loader] = read_summary(tmp_path / loader), torch.load(tmp_path / loader / "model.pt", weights_only=True)
    ref_summary, ref_model = runs["device"]
    for loader, (summary, model) in runs.items():
        assert summary["loader"] == loader and summary["test_total"] == 20
        assert summary["test_accuracy"] == ref_summary["test_accuracy"], (loader, summary["test_accuracy"])
        assert model["mean"] == ref_model["mean"] and model["std"] == ref_model["std"], loader
        assert all(torch.equal(model["model"][k], ref_model["model"][k]) for k in ref_model["model"]), loader
