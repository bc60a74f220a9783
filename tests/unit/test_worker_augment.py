"""--auto-augment / --random-erase in the DataLoader workers (loader.per_image): the DataLoader and stream
pipelines give bit for bit the batches of the training-process path (the device pipeline's, which is
what all three gave before), from any start step, with crops, flips and skipped samples."""

import pytest
import torch

from dist_cnn.config import DataConfig
from dist_cnn.data.augment import ImageAugment
from dist_cnn.data.loader import Augment
from dist_cnn.data.open import open_source
from dist_cnn.distributed.process_group import DistEnv
from tests.unit.test_same_batches import jpeg_folder

CPU = torch.device("cpu")
pytestmark = pytest.mark.slow  # three pipelines, DataLoader workers


def batches(root, loader: str, auto: str):
    cfg = DataConfig(dataset="imagefolder", data_dir=str(root), image_size=16, loader=loader, workers=1)
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
        image_aug=ImageAugment(auto, 0.5, seed=3, fill=(0.5, 0.4, 0.3)),
    )
    return pipe, [x.clone() for epoch in (0, 1) for x, _ in pipe.epoch(epoch, start_step=1)]


@pytest.mark.parametrize("auto", ["ta_wide", "augmix"])
def test_the_workers_augment_as_the_training_process_did(tmp_path, auto):
    root = jpeg_folder(tmp_path / "d")
    _, ref = batches(root, "device", auto)  # the per-image transforms in the training process
    plain = batches(root, "device", "none")[1]
    assert len(ref) == 4 and not all(torch.equal(a, b) for a, b in zip(ref, plain))  # they do change images
    for loader in ("dataloader", "stream"):
        pipe, got = batches(root, loader, auto)
        assert pipe.in_workers and len(got) == len(ref), loader
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), loader
