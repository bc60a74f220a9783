"""dist_cnn.train.evaluate: exact metrics at any world size, in a real 3-process gloo group.

499 test images over 3 ranks (166 + 166 + 167): no padding, no duplicates, the same confusion matrix
as one process. The model has BatchNorm and the eval batches differ between world sizes, so
evaluating in training mode (batch statistics) would also change the result.
"""

import pytest
import torch
from torch import nn

from dist_cnn.data.loader import Normalize, eval_shard
from dist_cnn.distributed.process_group import DistEnv
from dist_cnn.train.evaluate import evaluate
from tests.support.dist import run_group

N, CLASSES = 499, 5


def eval_set():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N, 3, 6, 6), dtype=torch.uint8, generator=g), torch.randint(
        0, CLASSES, (N,), generator=g
    )


def tiny_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, CLASSES))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 2.0)
    return m.train()


def score(env: DistEnv, batch_size: int = 50) -> dict:
    x, y = eval_set()
    model = tiny_model()
    res = evaluate(
        model,
        x,
        y,
        num_classes=CLASSES,
        env=env,
        precision="fp32",
        batch_size=batch_size,
        normalize=Normalize([0.5] * 3, [0.25] * 3, env.device, channels_last=False),
    )
    res["still_training"] = model.training
    res["shard"] = [eval_shard(N, env.rank, env.world_size).start, eval_shard(N, env.rank, env.world_size).stop]
    return res


def by_hand() -> torch.Tensor:
    x, y = eval_set()
    model = tiny_model().eval()
    with torch.no_grad():
        pred = model((x.float() / 255 - 0.5) / 0.25).argmax(1)
    conf = torch.zeros(CLASSES, CLASSES, dtype=torch.int64)
    for t, p in zip(y.tolist(), pred.tolist()):
        conf[t, p] += 1
    return conf


def test_single_process_matches_a_plain_loop():
    one = score(DistEnv(), batch_size=64)
    assert one["test_total"] == N and one["still_training"]  # the model's mode is restored
    assert one["confusion_matrix"] == by_hand().tolist()
    assert one["test_correct"] == sum(one["confusion_matrix"][i][i] for i in range(CLASSES))
    assert one["test_accuracy"] == one["test_correct"] / N


@pytest.mark.parametrize("start_method", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_three_ranks_count_every_image_once_and_match_one_process(tmp_path, start_method):
    one = score(DistEnv(), batch_size=64)
    ranks = run_group(3, score, 64, tmp_dir=tmp_path, start_method=start_method)
    assert [r["shard"] for r in ranks] == [[0, 166], [166, 332], [332, 499]]
    for r in ranks:  # every rank gets the summed counts
        assert r["test_total"] == N, r["test_total"]
        assert r["confusion_matrix"] == one["confusion_matrix"]
        assert r["test_accuracy"] == one["test_accuracy"] and r["per_class_accuracy"] == one["per_class_accuracy"]


def train_and_score_two_images(env: DistEnv, out: str) -> dict:
    """The trainer itself (DDP-wrapped BatchNorm model) at 3 ranks on a test set of 2 images: the
    last rank has no test image, so it must take part in no collective the others' forward makes."""
    from dist_cnn.config import Config
    from dist_cnn.data.datasets import Dataset
    from dist_cnn.train.trainer import Trainer

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (36, 3, 6, 6), dtype=torch.uint8, generator=g)
    y = torch.randint(0, CLASSES, (36,), generator=g)
    cfg = Config()
    cfg.data.dataset, cfg.data.loader = "python", "device"
    cfg.train.precision, cfg.train.batch_size, cfg.train.max_steps, cfg.train.epochs = "fp32", 12, 2, 1
    cfg.log.out, cfg.log.wandb, cfg.log.progress = out, "disabled", False
    trainer = Trainer(cfg, env, data=Dataset("python", list("abcde"), x, y, x[:2], y[:2]), model_factory=_bn_model)
    summary = trainer.fit()
    return {k: summary[k] for k in ("test_total", "test_correct", "world_size", "steps")} | {
        "wrapped": type(trainer.model).__name__
    }


def _bn_model(in_channels, num_classes, image_size):
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, num_classes)
    )


@pytest.mark.slow
def test_three_ranks_two_test_images_through_the_trainer(tmp_path):
    # spawn: the pytest process may have run autograd already, and autograd does not survive a fork
    ranks = run_group(3, train_and_score_two_images, str(tmp_path / "run"), tmp_dir=tmp_path, start_method="spawn")
    for r in ranks:
        assert r["wrapped"] == "DistributedDataParallel" and r["world_size"] == 3 and r["steps"] == 2, r
        assert r["test_total"] == 2 and 0 <= r["test_correct"] <= 2, r
    assert len({r["test_correct"] for r in ranks}) == 1
