"""Input pipelines: each epoch's plan, batched augmentation, and two ways to feed it.

An epoch's plan (the permutation and every image's crop offset and flip) is a pure function of
(seed, epoch), drawn for the whole epoch at once. Global batch i is plan positions [i*B, (i+1)*B) and
rank r takes the r-th slice of it, so the shards are disjoint, the global batch is the same at every
world size, and resuming at step k of an epoch replays exactly the batches and draws an uninterrupted
run would have seen.

- DevicePipeline: the whole dataset as uint8 on the training device, reflect-padded once; a batch's
  crops are one copy of the chosen windows of it, then a flip and a fused normalize, all batched. No
  workers, no host-to-device copy per step.
- LoaderPipeline: a torch DataLoader (worker processes gather the uint8 images, pinned memory for
  CUDA) for data that does not fit on the device; augmentation is the same batched code.

The recipe's per-image transforms (--auto-augment, --random-erase: augment.ImageAugment) run on the
CPU, one image at a time. The DataLoader and stream pipelines run them in their workers (image_keys,
per_image): each image is cropped and flipped there exactly as in the batch, then augmented with the
same seed, so the batches are the ones the training process would have made, without its CPU time and
without a device -> CPU -> device round trip per batch. The device pipeline keeps them in the
training process (its images never leave the device otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from dist_cnn.data import workers as worker_signals

PLAN_SEED_OFFSET = 1_000_003  # keeps data-order draws independent of the weight-init stream


@dataclass
class Augment:
    crop_padding: int = 0
    flip: bool = False
    alternate_flip: bool = False


def epoch_plan(
    n: int, seed: int, epoch: int, aug: Augment, perm: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """perm: another order of the n samples (shards read a few at a time); the other draws are the same."""
    g = torch.Generator().manual_seed(seed * PLAN_SEED_OFFSET + epoch)
    plan = {"perm": torch.randperm(n, generator=g)}
    if perm is not None:
        plan["perm"] = perm
    if aug.crop_padding:
        plan["shift"] = torch.randint(0, 2 * aug.crop_padding + 1, (n, 2), generator=g)
    if aug.flip and aug.alternate_flip:
        # Each image flips in alternate epochs from a per-image start (airbench): every epoch pair sees
        # both orientations, which random flips only give on average.
        start = torch.rand(n, generator=torch.Generator().manual_seed(seed * PLAN_SEED_OFFSET - 1)) < 0.5
        plan["flip"] = (start ^ bool(epoch % 2))[plan["perm"]]
    elif aug.flip:
        plan["flip"] = torch.rand(n, generator=g) < 0.5
    return plan


def crop_windows(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Every HxW window of the uint8 images [N,C,H,W] reflect-padded by `pad`: a view
    [N,C,2*pad+1,2*pad+1,H,W] of the padded copy, the window at (i, j) being the crop shifted by (i, j)."""
    h, w = x.shape[-2:]
    return torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect").unfold(2, h, 1).unfold(3, w, 1)


def crop_flip_at(
    windows: torch.Tensor, idx: torch.Tensor, shift: torch.Tensor, flip: torch.Tensor | None
) -> torch.Tensor:
    """Images `idx` of crop_windows' view, each cropped at its shift and flipped where `flip`: one
    strided copy of exactly the chosen windows."""
    return flip_where(windows[idx, :, shift[:, 0], shift[:, 1]], flip)


def flip_where(x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """The images of a batch [B,C,H,W] flipped horizontally where `flip` [B] is true."""
    # torch.where, not an in-place flip of the selected images: selecting them (nonzero) would wait
    # for the GPU every batch
    return x if flip is None else torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def crop_flip(x: torch.Tensor, shift: torch.Tensor | None, flip: torch.Tensor | None, pad: int) -> torch.Tensor:
    """Random crop (reflect padding) and horizontal flip of a uint8 batch [B,C,H,W], per-image draws."""
    if shift is not None:
        return crop_flip_at(crop_windows(x, pad), torch.arange(len(x), device=x.device), shift, flip)
    return flip_where(x, flip)


class Normalize:
    """uint8 -> float, (x/255 - mean)/std fused into one multiply-add; channels_last optional."""

    def __init__(self, mean, std, device, channels_last: bool):
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1).to(device)
        self.bias = (-mean / std).view(1, -1, 1, 1).to(device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._tiled: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            x = x.float()
        elif self.memory_format == torch.channels_last and x.dim() == 4:
            return self._channels_last(x)
        # addcmul reads the uint8 directly (it promotes to float32): one pass, then the layout
        return torch.addcmul(self.bias, x, self.scale).to(memory_format=self.memory_format)

    def _channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 -> normalized float32 in channels_last with no float layout copy: the uint8 batch in
        NHWC order (free when it is already channels_last, as the in-memory set is stored), each image
        one row, scaled by the per-channel factors tiled along the row. A broadcast over the 3-wide
        channel dimension does not vectorize; one over whole rows does. The same multiply-add per
        element as the NCHW path, so the same bits."""
        n, c, h, w = x.shape
        rows = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1).reshape(n, h * w * c)
        if (h, w) not in self._tiled:
            self._tiled[(h, w)] = tuple(t.view(1, c).expand(h * w, c).reshape(-1) for t in (self.bias, self.scale))
        bias, scale = self._tiled[(h, w)]
        return torch.addcmul(bias, rows, scale).view(n, h, w, c).permute(0, 3, 1, 2)


def normalization_stats(train_x: torch.Tensor, mode: str):
    """Per-channel mean and (unbiased) std of the whole training set, in [0, 1] units.

    Streamed in chunks of ~16 MB of float32 with float64 sums, so memory does not grow with the data
    (a prefix would be biased: image folders list their images class by class)."""
    if mode == "half":  # the tutorial's Normalize((0.5,)*3, (0.5,)*3)
        return [0.5] * train_x.shape[1], [0.5] * train_x.shape[1]
    n, c = train_x.shape[0], train_x.shape[1]
    per_image = max(1, train_x[0].numel()) if n else 1
    chunk = max(1, (1 << 22) // per_image)
    total = torch.zeros(c, dtype=torch.float64)
    squares = torch.zeros(c, dtype=torch.float64)
    for i in range(0, n, chunk):
        x = train_x[i : i + chunk].float()
        total += x.sum(dim=(0, 2, 3), dtype=torch.float64)
        squares += x.square_().sum(dim=(0, 2, 3), dtype=torch.float64)
    count = n * train_x.shape[2] * train_x.shape[3]
    mean = total / max(count, 1)
    var = (squares - count * mean * mean) / max(count - 1, 1)
    std = var.clamp(min=0).sqrt().clamp(min=1e-3)  # a constant channel must not divide by zero
    return (mean / 255).tolist(), (std / 255).tolist()


def plan_draws(plan: dict, key: str, pos: slice, device=None):
    """The plan's `key` draws ("shift" or "flip") at positions `pos`, or None when the recipe has none."""
    return plan[key][pos].to(device) if key in plan else None


def draws_on(plan: dict, device) -> dict:
    """The epoch's crop and flip draws on the device, copied once per epoch: a slice of a pageable CPU
    tensor copied per batch is a blocking host-to-device copy each time."""
    return {k: v.to(device) for k, v in plan.items() if k in ("shift", "flip")}


def image_keys(plan: dict, pos: slice, epoch: int) -> list[tuple]:
    """(epoch, index, position, shift, flip) for each image at plan positions `pos`: what a DataLoader
    worker needs to crop, flip and augment the image itself (per_image)."""
    index = plan["perm"][pos].tolist()
    none = [None] * len(index)
    shift = [tuple(s) for s in plan["shift"][pos].tolist()] if "shift" in plan else none
    flip = plan["flip"][pos].tolist() if "flip" in plan else none
    return [(epoch, i, p, s, f) for i, p, s, f in zip(index, range(pos.start, pos.stop), shift, flip)]


def per_image(img: torch.Tensor, key: tuple, pad: int, image_aug) -> torch.Tensor:
    """One uint8 [C, H, W] image (in a worker): crop_flip as its batch would have it (a gather: the
    same pixels), then ImageAugment.one seeded by its plan position, as ImageAugment's batch call."""
    epoch, _, pos, shift, flip = key
    if shift is not None or flip is not None:
        img = crop_flip(
            img[None],
            None if shift is None else torch.tensor([shift]),
            None if flip is None else torch.tensor([flip]),
            pad,
        )[0]
    return image_aug.one(img, epoch, pos)


def apply_image_aug(aug, x: torch.Tensor, epoch: int, pos: slice) -> torch.Tensor:
    """The recipe's per-image transforms (augment.ImageAugment), keyed by each image's plan position."""
    return aug(x, epoch, range(pos.start, pos.stop)) if aug else x


def rank_slice(step: int, batch: int, rank: int, world: int) -> slice:
    start = step * batch * world + rank * batch
    return slice(start, start + batch)


class DevicePipeline:
    def __init__(
        self, x, y, *, batch_per_rank, rank, world, seed, aug: Augment, normalize: Normalize, device, image_aug=None
    ):
        self.y, self.n = y.to(device), len(x)
        self.batch, self.rank, self.world, self.seed, self.aug = batch_per_rank, rank, world, seed, aug
        self.normalize, self.device, self.image_aug = normalize, device, image_aug
        self.steps_per_epoch = len(x) // (batch_per_rank * world)
        # Padded once, not every batch: a batch's crops are then one copy out of the padded set, which
        # replaces the set on the device. Stored in the layout Normalize gives the model, so batches
        # come out in it and need no layout copy (any other callable gets them as the set was given).
        x = x.to(device, memory_format=getattr(normalize, "memory_format", torch.preserve_format))
        self.windows = crop_windows(x, aug.crop_padding) if aug.crop_padding else None
        self.x = x if self.windows is None else None

    def epoch(self, epoch: int, start_step: int = 0):
        plan = {k: v.to(self.device) for k, v in epoch_plan(self.n, self.seed, epoch, self.aug).items()}
        for step in range(start_step, self.steps_per_epoch):
            pos = rank_slice(step, self.batch, self.rank, self.world)
            idx = plan["perm"][pos]
            if self.windows is not None:
                x = crop_flip_at(self.windows, idx, plan["shift"][pos], plan_draws(plan, "flip", pos))
            else:
                x = flip_where(self.x[idx], plan_draws(plan, "flip", pos))
            yield self.normalize(apply_image_aug(self.image_aug, x, epoch, pos)), self.y[idx]


class _ShardSampler(Sampler):
    """Yields this rank's indices of the epoch plan from a given step on (DistributedSampler's role)."""

    def __init__(self, pipeline: LoaderPipeline):
        self.p = pipeline

    def __iter__(self):
        p = self.p
        for step in range(p.start_step, p.steps_per_epoch):
            pos = rank_slice(step, p.batch, p.rank, p.world)
            yield from image_keys(p.plan, pos, p.current_epoch) if p.in_workers else p.plan["perm"][pos].tolist()

    def __len__(self):
        return (self.p.steps_per_epoch - self.p.start_step) * self.p.batch


class _Images(TorchDataset):
    """Images by index; by image_keys' key, cropped, flipped and augmented here (per_image)."""

    def __init__(self, x, y, pad: int = 0, image_aug=None):
        self.x, self.y, self.pad, self.image_aug = x, y, pad, image_aug

    def __len__(self):
        return len(self.x)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return per_image(self.x[key[1]], key, self.pad, self.image_aug), self.y[key[1]]
        return self.x[key], self.y[key]


class LoaderPipeline:
    def __init__(
        self,
        x,
        y,
        *,
        batch_per_rank,
        rank,
        world,
        seed,
        aug: Augment,
        normalize: Normalize,
        device,
        workers: int,
        image_aug=None,
    ):
        self.n, self.batch, self.rank, self.world, self.seed, self.aug = len(x), batch_per_rank, rank, world, seed, aug
        self.normalize, self.device, self.image_aug = normalize, device, image_aug
        self.steps_per_epoch = self.n // (batch_per_rank * world)
        self.plan, self.start_step, self.current_epoch = None, 0, 0
        self.in_workers = bool(image_aug)  # the per-image transforms run in the workers (module docstring)
        self.loader = DataLoader(
            _Images(x, y, aug.crop_padding, image_aug),
            batch_size=batch_per_rank,
            sampler=_ShardSampler(self),
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
            drop_last=False,
            worker_init_fn=worker_signals.ignore_stop_signals,
        )

    def epoch(self, epoch: int, start_step: int = 0):
        self.plan, self.start_step = epoch_plan(self.n, self.seed, epoch, self.aug), start_step
        self.current_epoch, draws = epoch, draws_on(self.plan, self.device)
        for step, (x, y) in enumerate(worker_signals.start(self.loader), start=start_step):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if not self.in_workers:  # else cropped, flipped and augmented by the workers
                pos = rank_slice(step, self.batch, self.rank, self.world)
                shift, flip = plan_draws(draws, "shift", pos), plan_draws(draws, "flip", pos)
                x = apply_image_aug(self.image_aug, crop_flip(x, shift, flip, self.aug.crop_padding), epoch, pos)
            yield self.normalize(x), y


def eval_shard(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous part of the test set: no padding, no duplicates, any world size."""
    return slice(rank * n // world, (rank + 1) * n // world)
