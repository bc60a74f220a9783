"""Train your own network on your own torch Datasets with dist_cnn's distributed trainer.

python examples/custom_model.py                          # one process
torchrun --nproc_per_node=2 examples/custom_model.py     # DDP, 2 ranks (or srun under SLURM)
"""

import os
import sys

from torch import nn
from torchvision.datasets import FakeData
from torchvision.transforms import v2

from dist_cnn import fit


def block(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int):  # dist_cnn passes the keywords it names
        super().__init__()
        layers = [*block(in_channels, 32), nn.MaxPool2d(2), *block(32, 64), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


if __name__ == "__main__":
    to_tensor = v2.PILToTensor()  # uint8 [C, H, W]; float tensors in [0, 1] work too
    train = FakeData(512, (3, 32, 32), num_classes=4, transform=to_tensor, random_offset=0)
    test = FakeData(128, (3, 32, 32), num_classes=4, transform=to_tensor, random_offset=512)
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/custom-model"
    options = dict(epochs=2, batch_size=64, lr=0.05, flip=True, wandb="disabled", precision="fp32")  # the CLI's
    summary = fit(SmallNet, train=train, test=test, out=out, **options)
    if os.environ.get("RANK", "0") == "0" and "test_accuracy" in summary:  # every rank gets the summary
        print(f"test accuracy {summary['test_accuracy']:.3f} on {summary['world_size']} process(es)")
