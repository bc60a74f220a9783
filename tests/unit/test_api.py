"""fit()'s option table and dataset reading (the run itself: tests/e2e/test_any_model.py). In-process."""

import pytest
import torch
from PIL import Image

from dist_cnn.api import build_config, datasets_from, materialize
from dist_cnn.errors import UserError


class Pairs(torch.utils.data.Dataset):
    def __init__(self, items, classes=None):
        self.items = items
        if classes:
            self.classes = classes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_options_are_config_fields_or_flag_names(tmp_path):
    cfg = build_config(
        {
            "epochs": 3,
            "batch_size": 32,
            "lr": 0.1,
            "out": tmp_path,
            "keep_checkpoints": 2,
            "mixup_alpha": 0.2,
            "flip": True,
        }
    )
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.lr, cfg.log.out) == (3, 32, 0.1, str(tmp_path))
    assert cfg.ckpt.keep == 2 and cfg.data.flip
    f = tmp_path / "c.toml"
    f.write_text("[train]\nepochs = 7\nseed = 4\n")
    cfg = build_config({"config": f, "epochs": 1})
    assert (cfg.train.epochs, cfg.train.seed) == (1, 4)
    with pytest.raises(UserError, match="unknown option 'epoch'"):
        build_config({"epoch": 1})
    with pytest.raises(UserError, match="train.epochs must be float"):
        build_config({"epochs": "3"})


def test_materialize_uint8_float_and_pil():
    u8 = torch.randint(0, 256, (3, 8, 8), dtype=torch.uint8)
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy())
    x, y = materialize(Pairs([(u8, 1), (u8.float() / 255, 0), (pil, 2)]), "train")
    assert x.dtype == torch.uint8 and x.shape == (3, 3, 8, 8) and y.tolist() == [1, 0, 2]
    assert torch.equal(x[0], u8) and torch.equal(x[1], u8) and torch.equal(x[2], u8)
    gray, _ = materialize(Pairs([(torch.zeros(8, 8, dtype=torch.uint8), 0)]), "t")
    assert gray.shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    "items,match",
    [
        ([(torch.randn(3, 8, 8) * 5, 0)], r"float images must be in \[0, 1\]"),
        ([(torch.zeros(3, 8, 8, dtype=torch.uint8), 0), (torch.zeros(3, 9, 9, dtype=torch.uint8), 0)], "differs"),
        ([torch.zeros(3, 8, 8)], r"\(image, label\) pair"),
        ([("x", 0)], "tensors or PIL images"),
        ([], "empty"),
    ],
)
def test_bad_datasets_are_one_line(items, match):
    with pytest.raises(UserError, match=match) as e:
        materialize(Pairs(items), "train")
    assert "\n" not in str(e.value)


def test_classes_and_label_range():
    img = torch.zeros(3, 4, 4, dtype=torch.uint8)
    d = datasets_from(Pairs([(img, 0), (img, 2)], classes=["a", "b", "c"]), Pairs([(img, 1)]))
    assert d.classes == ["a", "b", "c"] and d.name == "python" and d.image_size == 4
    assert datasets_from(Pairs([(img, 0), (img, 2)]), Pairs([(img, 1)])).classes == ["0", "1", "2"]
    with pytest.raises(UserError, match="labels must be in"):
        datasets_from(Pairs([(img, 0), (img, 5)], classes=["a", "b"]), Pairs([(img, 1)]))
    with pytest.raises(UserError, match="also pass test="):
        datasets_from(Pairs([(img, 0)]), None)
