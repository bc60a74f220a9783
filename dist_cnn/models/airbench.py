"""airbench: the airbench94 network (github.com/KellerJordan/cifar10-airbench, airbench94.py) and its
whitening layer, set from a sample of the training images before training."""

import torch
from torch import nn

from dist_cnn.errors import UserError


class Conv(nn.Conv2d):
    """Bias-free 3x3 conv whose first in_channels filters start as identity: an implicit residual."""

    def __init__(self, cin, cout, kernel_size=3, padding=1, bias=False):
        super().__init__(cin, cout, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class BatchNorm(nn.BatchNorm2d):
    """airbench's BN: running stats follow the batch fast (airbench momentum 0.6 = torch momentum 0.4),
    scale frozen at 1 (it would only fight the weight decay of the next conv), shift trainable."""

    def __init__(self, num_features, momentum=0.6, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class ConvGroup(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(cout)
        self.conv2 = Conv(cout, cout)
        self.norm2 = BatchNorm(cout)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def patch_moments(images: torch.Tensor, k: int = 2, chunk: int = 1024) -> torch.Tensor:
    """Uncentered second moment E[p p^T] of all k x k patches, p flattened in (c, h, w) order (as
    airbench; the inputs are normalized so it is ~the covariance). Chunked: 5000 CIFAR images would
    otherwise materialize ~230 MB of patches."""
    c = images.shape[1]
    acc, n = torch.zeros(c * k * k, c * k * k, dtype=torch.float64), 0
    for x in images.split(chunk):
        p = x.double().unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H', W', k, k]
        p = p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        acc += p.T @ p
        n += p.shape[0]
    return acc / n


def whitening_weights(images: torch.Tensor, eps: float = 5e-4, k: int = 2) -> torch.Tensor:
    """Conv weights [2*C*k*k, C, k, k]: the patch-covariance eigenvectors (largest eigenvalue first)
    scaled by 1/sqrt(eigval + eps), then their negatives, so GELU sees both signs of every direction."""
    c = images.shape[1]
    eigvals, eigvecs = torch.linalg.eigh(patch_moments(images, k))  # ascending; columns are vectors
    eigvals, eigvecs = eigvals.flip(0), eigvecs.T.flip(0)  # rows, descending as airbench
    w = (eigvecs / torch.sqrt(eigvals + eps)[:, None]).reshape(c * k * k, c, k, k)
    return torch.cat((w, -w)).float()


class Airbench(nn.Module):
    def __init__(self, in_channels=3, num_classes=10, widths=(64, 256, 256), scale=1 / 9):
        super().__init__()
        w0 = 2 * in_channels * 2 * 2
        self.whiten = Conv(in_channels, w0, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False  # set from data, never trained; its bias is trained
        self.act = nn.GELU()
        self.layers = nn.Sequential(
            ConvGroup(w0, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2])
        )
        self.pool = nn.AdaptiveMaxPool2d(1)  # airbench's MaxPool2d(3) on the 3x3 map, for any image size
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = scale  # small logits at init; airbench's tuned LRs assume it

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4):
        """Set the whitening conv from normalized training images [N, C, H, W] (airbench uses 5000)."""
        self.whiten.weight.copy_(whitening_weights(images.detach().cpu(), eps))

    def forward(self, x):
        x = self.layers(self.act(self.whiten(x)))
        return self.head(torch.flatten(self.pool(x), 1)) * self.scale


def airbench(in_channels, num_classes, image_size):
    if image_size < 9:  # the 2x2 conv and three 2x pools must leave at least one pixel
        raise UserError(f"airbench needs images of at least 9x9 pixels, got {image_size}")
    return Airbench(in_channels, num_classes)
