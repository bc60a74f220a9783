"""Baseline: the PyTorch "Training a Classifier" CIFAR-10 tutorial, as published.
https://pytorch.org/tutorials/beginner/blitz/cifar10_tutorial.html

Changed from the tutorial, and only this: the data comes from the shared ImageFolder copy of CIFAR-10
(no download), the test set is evaluated after every epoch (outside the timed training loop) so the time
at which the tutorial reached its final accuracy is known, and the figures are returned/printed/saved.
It deliberately does not import dist_cnn: it is what dist_cnn is measured against (benchmarks.common, for
the command line and the result stamp, does not either).

    bash launch/local.sh --max-steps 1   # unpacks ../shared/data/cifar10-jpeg.tar.gz into data/cifar10-jpeg once
    python benchmarks/tutorial.py --data-dir data/cifar10-jpeg [--epochs 2] [--max-images N] [--json out.json]

Or from another script: `from benchmarks import tutorial` and call tutorial.run(data_dir, epochs, ...) -> dict.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim
import torchvision
import torchvision.transforms as transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks

from benchmarks.common import CIFAR_DIR, Stamp, parser  # noqa: E402


class Net(nn.Module):
    """The tutorial's network, verbatim: 62,006 parameters."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)  # flatten all dimensions except batch
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        x = self.fc3(x)
        return x


class WideNet(Net):
    """Not in the tutorial: dist_cnn's `seed` model (3x3 padded convs 3->16->32, fc 2048-120-84-10,
    261,982 parameters), so the seed architecture can also be run the tutorial's way (--net wide)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 8 * 8, 120)


NETS = {"tutorial": Net, "wide": WideNet}


def test_accuracy(net, testloader):
    correct = 0
    total = 0
    with torch.no_grad():  # not training, so no gradients
        for images, labels in testloader:
            outputs = net(images)
            _, predicted = torch.max(outputs.data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return correct / total


def run(data_dir, epochs=2, max_images=None, threads=None, net="tutorial", seed=None, log=print):
    """Train and test the tutorial way; returns the figures as a dict (also what --json writes)."""
    if threads:
        torch.set_num_threads(threads)
    if seed is not None:  # the tutorial is unseeded; a seed only makes repeats comparable
        torch.manual_seed(seed)

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    batch_size = 4
    trainset = torchvision.datasets.ImageFolder(os.path.join(data_dir, "train"), transform=transform)
    trainloader = torch.utils.data.DataLoader(trainset, batch_size=batch_size, shuffle=True, num_workers=2)
    testset = torchvision.datasets.ImageFolder(os.path.join(data_dir, "test"), transform=transform)
    testloader = torch.utils.data.DataLoader(testset, batch_size=batch_size, shuffle=False, num_workers=2)

    model = NETS[net]()
    criterion = nn.CrossEntropyLoss()
    optimizer = optim.SGD(model.parameters(), lr=0.001, momentum=0.9)

    train_seconds, train_images, history = 0.0, 0, []
    for epoch in range(epochs):  # loop over the dataset multiple times
        # the timed span includes starting the loader's workers each epoch, as the tutorial pays it
        t0 = time.perf_counter()
        running_loss = 0.0
        for i, data in enumerate(trainloader, 0):
            # get the inputs; data is a list of [inputs, labels]
            inputs, labels = data

            # zero the parameter gradients
            optimizer.zero_grad()

            # forward + backward + optimize
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()

            # print statistics
            running_loss += loss.item()
            if i % 2000 == 1999:  # print every 2000 mini-batches
                log(f"[{epoch + 1}, {i + 1:5d}] loss: {running_loss / 2000:.3f}")
                running_loss = 0.0
            if max_images and (i + 1) * batch_size >= max_images:
                break
        train_seconds += time.perf_counter() - t0
        train_images += min(len(trainset), (i + 1) * batch_size)

        acc = test_accuracy(model, testloader)
        history.append({"epoch": epoch + 1, "train_seconds": round(train_seconds, 2), "test_accuracy": acc})
        log(f"epoch {epoch + 1}: {train_seconds:.1f} s of training so far, test accuracy {100 * acc:.2f}%")

    result = {
        "net": net,
        "params": sum(p.numel() for p in model.parameters()),
        "epochs": epochs,
        "max_images": max_images,
        "threads": torch.get_num_threads(),
        "train_images": train_images,
        "train_seconds": round(train_seconds, 2),
        "images_per_second": round(train_images / train_seconds, 1),
        "test_accuracy": history[-1]["test_accuracy"],
        "history": history,  # cumulative training seconds and test accuracy after each epoch
    }
    log(
        f"Finished Training: {train_images} images in {train_seconds:.1f} s "
        f"({result['images_per_second']:.0f} images/s), threads {result['threads']}"
    )
    log(f"Accuracy of the network on the {len(testset)} test images: {100 * result['test_accuracy']:.2f} %")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "folder holding train/ and test/ (ImageFolder layout)", CIFAR_DIR)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument(
        "--max-images",
        type=int,
        default=None,
        help="stop each epoch after N training images (a quick images/s estimate)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--net", choices=sorted(NETS), default="tutorial")
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)
    stamp = Stamp()
    for sub in ("train", "test"):
        if not os.path.isdir(os.path.join(args.data_dir, sub)):
            ap.error(f"{args.data_dir} has no {sub}/ folder; unpack cifar10-jpeg.tar.gz there")
    result = run(args.data_dir, args.epochs, args.max_images, args.threads, args.net, args.seed)
    stamp.write(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
