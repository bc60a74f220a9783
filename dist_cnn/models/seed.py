"""seed: the default model, a widened PyTorch-tutorial CNN.

The published tutorial Net is conv 3->6->16 5x5, fc 400-120-84-10 (62,006 parameters); this one uses 3x3
padded convs 3->16->32 and fc 2048-120-84-10 (261,982 parameters at 3x32x32).
"""

import torch
import torch.nn.functional as F
from torch import nn

from dist_cnn.errors import UserError


class SeedNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * (image_size // 4) ** 2, 120)  # two 2x pools floor the size twice
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def seed(in_channels, num_classes, image_size):
    if image_size < 4:
        raise UserError(f"seed needs images of at least 4x4 pixels, got {image_size}")
    return SeedNet(in_channels, num_classes, image_size)
