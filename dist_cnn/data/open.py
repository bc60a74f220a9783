"""Which source a configuration reads: the one place that knows the kinds of sources.

--loader device/dataloader: tensors in memory. --loader stream: an image folder streamed from its
files. --loader auto: in memory, unless an image folder decodes to more than half the free memory or
the recipe crops the decoded files (--train-crop random-resized); then streamed. The recipe and the
batches are the same whichever is chosen, so the choice (which depends on the machine) never changes
results.
"""

from __future__ import annotations

import logging
import os

import torch

from dist_cnn.data.datasets import load_dataset
from dist_cnn.data.folder import FolderIndex, scan_folder
from dist_cnn.data.shards.order import make_order
from dist_cnn.data.shards.dataset import open_split_readers
from dist_cnn.data.source import DataSource, check_recipe, recipe_of
from dist_cnn.data.stream import StreamSource, local_world
from dist_cnn.distributed.process_group import rank0_only, rank0_then_all
from dist_cnn.errors import UserError

log = logging.getLogger(__name__)


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits_in_memory(index: FolderIndex, image_size: int, device: torch.device, local_world: int = 1) -> tuple[bool, str]:
    """Whether the decoded folder fits half the free memory (each rank on a node holds its own copy)."""
    images = len(index.train) + len(index.test)
    need = images * 3 * image_size**2
    budget = available_memory(device) // 2 // (1 if device.type == "cuda" else max(1, local_world))
    where = "GPU memory" if device.type == "cuda" else "RAM"
    gib = 2**30
    return need <= budget, (
        f"{images} images at {image_size} px decode to {need / gib:.1f} GiB, budget {budget / gib:.1f} GiB "
        f"(half the free {where}{' per rank' if local_world > 1 and device.type != 'cuda' else ''})"
    )


def _streamed(index: FolderIndex, data_cfg, env, measure: bool) -> StreamSource:
    source = StreamSource(
        data_cfg.dataset,
        index.train,
        index.test,
        recipe_of(data_cfg),
        skip_bad=data_cfg.skip_bad_images,
        decode=data_cfg.decode,
    )
    if not measure:  # the caller has the normalization (a saved model's) and needs no probe images
        return source
    return source.attach(rank0_only(env, lambda: source.measure(data_cfg.normalize, data_cfg.workers)))


def _choose(index: FolderIndex, data_cfg, env) -> tuple[bool, str]:
    """(stream?, why) for an image folder."""
    if data_cfg.loader == "stream":
        return True, "--loader stream"
    if data_cfg.loader != "auto":
        return False, ""
    if data_cfg.train_crop == "random-resized":
        return True, "auto: streamed, --train-crop random-resized crops the decoded files"
    fits, why = rank0_only(env, lambda: fits_in_memory(index, data_cfg.image_size, env.device, local_world()))
    return (not fits), (f"auto: in memory, {why}" if fits else f"auto: streamed, {why}")


def _shards(data_cfg, env, measure: bool, timeout: float) -> StreamSource:
    """--dataset shards: rank 0 reads (or builds) the index and checks it; every rank reads the shards."""
    classes, train, test = rank0_only(env, lambda: open_split_readers(data_cfg, timeout))
    source = StreamSource(
        "shards",
        train,
        test,
        recipe_of(data_cfg),
        skip_bad=data_cfg.skip_bad_images,
        decode=data_cfg.decode,
        order=make_order(train, data_cfg.shuffle),
    )
    if not measure:
        return source
    return source.attach(rank0_only(env, lambda: source.measure(data_cfg.normalize, data_cfg.workers)))


def open_source(data_cfg, env, measure: bool = True, timeout: float = 300.0) -> tuple[DataSource, str]:
    """The source data_cfg names on this rank, and why it is read that way (for the log). measure:
    False skips a streamed source's normalization sample (evaluating a saved model). timeout: seconds
    a request to a remote shards location may take (--timeout)."""
    if data_cfg.dataset == "shards":
        return _shards(data_cfg, env, measure, timeout), f"--dataset shards, --shuffle {data_cfg.shuffle}"
    if data_cfg.decode == "gpu" and env.device.type != "cuda" and data_cfg.dataset == "imagefolder":
        raise UserError("--decode gpu decodes JPEGs with nvjpeg on a CUDA GPU; on the CPU use --decode cpu")
    note = ""
    if data_cfg.dataset == "imagefolder" and data_cfg.loader in ("auto", "stream"):
        index = rank0_only(env, lambda: scan_folder(data_cfg.data_dir, data_cfg.test_split))
        stream, note = _choose(index, data_cfg, env)
        if stream:
            return _streamed(index, data_cfg, env, measure), note
    check_recipe(recipe_of(data_cfg), "memory")
    if data_cfg.skip_bad_images:  # in memory, every file is decoded up front and a bad one stops the load
        raise UserError(
            "--skip-bad-images works with --loader stream (image folders); the in-memory loaders "
            f"(--loader {data_cfg.loader}) read every image before training and stop at a bad one"
        )
    return rank0_then_all(env, lambda: load_dataset(data_cfg)), note
