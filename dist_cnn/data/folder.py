"""Image folders: train/<class>/* and <test split>/<class>/*, listed once, read file by file.

A split is a FolderReader (the streamed pipeline's source.SampleReader): the paths relative to the
root as one numpy bytes array (~40 bytes an image, no Python object per file), labels as int64, so
a process's memory does not grow with the number of images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from dist_cnn.data.datasets import scan_classes
from dist_cnn.errors import UserError


@dataclass
class FolderReader:
    """Files of one split (a source.SampleReader)."""

    root: str
    paths: np.ndarray  # dtype S<n>
    labels: np.ndarray  # int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    name = path

    def label(self, i: int) -> int:
        return int(self.labels[i])

    def read(self, i: int) -> bytes:
        path = self.path(i)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise UserError(f"imagefolder: cannot read {path} ({e.strerror or e})") from None


@dataclass
class FolderIndex:
    """A listed folder: its classes and the two splits."""

    classes: list[str]
    train: FolderReader
    test: FolderReader


def _scan_split(root: str, split: str) -> tuple[list[str], list[bytes], list[int]]:
    """Class names, paths relative to root (bytes) and labels, in datasets.scan_classes' order."""
    classes, files = scan_classes(root, split)
    paths, labels = [], []
    for label, (c, names) in enumerate(zip(classes, files)):
        prefix = os.fsencode(os.path.join(split, c)) + b"/"
        paths += [prefix + os.fsencode(f) for f in names]
        labels += [label] * len(names)
    return classes, paths, labels


def scan_folder(root: str, test_split: str = "test") -> FolderIndex:
    """List train/<class>/* and <test_split>/<class>/* (sorted classes and files), ImageNet's layout too."""
    root = os.path.normpath(root)
    if not os.path.isdir(root):
        raise UserError(f"imagefolder: {root} not found; point --data-dir at a folder holding train/ and {test_split}/")
    classes, train_paths, train_labels = _scan_split(root, "train")
    test_classes, test_paths, test_labels = _scan_split(root, test_split)
    if test_classes != classes:
        differ = sorted(set(classes) ^ set(test_classes))
        raise UserError(f"imagefolder: train/ and {test_split}/ class folders differ ({differ[:5]})")

    def reader(paths, labels):
        return FolderReader(root, np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64), classes)

    return FolderIndex(classes, reader(train_paths, train_labels), reader(test_paths, test_labels))
