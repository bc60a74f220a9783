"""The loader never changes the recipe: the same image folder through the device pipeline, the
DataLoader pipeline and the streamed pipeline gives bit-equal uint8 batches, the same normalization,
probe images and test batches, for the default recipe and for the ImageNet-style crops on a stream."""

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cnn.config import DataConfig
from dist_cnn.data.loader import Augment
from dist_cnn.data.open import open_source
from dist_cnn.distributed.process_group import DistEnv
from dist_cnn.errors import UserError

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow  # three pipelines with DataLoader workers, twice
LOADERS = ("device", "dataloader", "stream")


def jpeg_folder(root):
    """Non-square JPEGs larger than the training size, and a few exactly that size."""
    rng = np.random.default_rng(5)
    for split, n in (("train", 14), ("test", 7)):
        for i in range(n):
            c = i % 2
            w, h = (16, 16) if i % 5 == 0 else (int(rng.integers(20, 48)), int(rng.integers(18, 40)))
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            pix = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pix).save(d / f"{i:03d}.jpg", quality=90)
    return root


def read_all(root, loader: str, **recipe):
    cfg = DataConfig(dataset="imagefolder", data_dir=str(root), image_size=16, loader=loader, workers=1, **recipe)
    source, _ = open_source(cfg, DistEnv())
    pipe = source.train_batches(
        loader=loader,
        batch_per_rank=4,
        rank=0,
        world=1,
        seed=3,
        aug=Augment(crop_padding=2, flip=True),
        normalize=lambda x: x,  # the uint8 batches themselves
        device=CPU,
        workers=1,
    )
    train = [x.clone() for epoch in (0, 1) for x, _ in pipe.epoch(epoch, start_step=1)]
    test = [
        x for x, _ in source.eval_batches(rank=0, world=1, normalize=lambda x: x, device=CPU, batch_size=3, workers=0)
    ]
    return source, pipe, train, torch.cat(test)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return jpeg_folder(tmp_path_factory.mktemp("same"))


def test_every_loader_gives_the_same_batches(folder):
    runs = {loader: read_all(folder, loader) for loader in LOADERS}
    ref_source, ref_pipe, ref_train, ref_test = runs["device"]
    assert ref_train[0].dtype == torch.uint8 and ref_train[0].shape == (4, 3, 16, 16) and len(ref_train) == 4
    for loader, (source, pipe, train, test) in runs.items():
        assert pipe.kind == loader
        assert all(torch.equal(a, b) for a, b in zip(ref_train, train)) and len(train) == len(ref_train), loader
        assert torch.equal(test, ref_test), loader
        assert source.normalization("dataset") == ref_source.normalization("dataset"), loader
        assert all(torch.equal(a, b) for a, b in zip(source.probe(8), ref_source.probe(8))), loader
        assert [source.test_name(i) for i in range(7)] == [ref_source.test_name(i) for i in range(7)]


def test_random_resized_crops_are_a_recipe_of_the_files(folder):
    crops = dict(train_crop="random-resized", eval_resize="center-crop")
    source, pipe, train, test = read_all(folder, "stream", **crops)
    _, _, again, _ = read_all(folder, "stream", **crops)
    assert all(torch.equal(a, b) for a, b in zip(train, again))
    assert not torch.equal(train[0], read_all(folder, "stream")[2][0])  # another recipe, other batches
    with pytest.raises(UserError, match="--train-crop random-resized"):
        read_all(folder, "device", **crops)  # in-memory tensors cannot follow it: refused, not changed
    auto, _ = open_source(DataConfig(dataset="imagefolder", data_dir=str(folder), image_size=16, **crops), DistEnv())
    assert auto.kind == "stream"
