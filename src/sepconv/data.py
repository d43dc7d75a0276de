"""Fashion-MNIST from the IDX gzip files of the Debian package ``dataset-fashion-mnist`` — offline, validated.

Every file is checked: IDX magic number, counts (60,000 train / 10,000 test), 28x28 images, labels
0-9, and the exact payload length, so a corrupt or truncated file raises a clear error instead of
giving a silently short dataset.

>>> test = fashion_mnist("test")
>>> len(test), test[0][0].shape, test.classes[test[0][1]]
(10000, torch.Size([1, 28, 28]), 'Ankle boot')
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["APT_PACKAGE", "CLASSES", "DEFAULT_ROOT", "FashionMNIST", "fashion_mnist", "read_idx"]

APT_PACKAGE = "dataset-fashion-mnist"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
IMAGE_SIZE = 28
MEAN, STD = 0.2860, 0.3530  # of the training images scaled to [0, 1]
_UBYTE = 0x08


def read_idx(path: Path, shape: tuple[int, ...]) -> Tensor:
    """A uint8 tensor of exactly ``shape`` from a gzipped IDX file; ValueError if the file disagrees."""
    try:
        with gzip.open(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path} is not a readable gzip file (corrupt or truncated?): {error}") from error
    header = 4 + 4 * len(shape)
    if len(data) < header:
        raise ValueError(f"{path} is truncated: {len(data)} bytes, shorter than its IDX header")
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != _UBYTE or ndim != len(shape):
        raise ValueError(
            f"{path}: bad IDX magic {data[:4].hex()}, expected 0000{_UBYTE:02x}{len(shape):02x} (uint8, {len(shape)}-d)"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if dims != shape:
        raise ValueError(f"{path}: IDX header says shape {dims}, expected {shape}")
    expected = header + int(torch.Size(shape).numel())
    if len(data) != expected:
        raise ValueError(f"{path}: {len(data)} bytes, expected {expected} for shape {shape} (truncated or padded)")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


class FashionMNIST(Dataset[tuple[Tensor, int]]):
    """Images as float32 ``(1, 28, 28)`` tensors (scaled to [0, 1], then normalized if asked), int labels."""

    classes = CLASSES

    def __init__(self, images: Tensor, labels: Tensor, *, normalize: bool = True) -> None:
        x = images.unsqueeze(1).float().div_(255)
        self.images = (x - MEAN) / STD if normalize else x
        self.labels = labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


def fashion_mnist(split: str = "train", root: str | Path | None = None, *, normalize: bool = True) -> FashionMNIST:
    """The ``"train"`` (60,000) or ``"test"`` (10,000) split, read from ``root`` (default: the Debian package)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(map(repr, SPLITS))}; got {split!r}")
    root = Path(root) if root is not None else DEFAULT_ROOT
    images_name, labels_name, count = SPLITS[split]
    missing = [name for name in (images_name, labels_name) if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {', '.join(missing)} not found in {root}; install the Debian package: "
            f"apt-get install {APT_PACKAGE} (or pass root= the folder holding the IDX .gz files)"
        )
    images = read_idx(root / images_name, (count, IMAGE_SIZE, IMAGE_SIZE))
    labels = read_idx(root / labels_name, (count,))
    if int(labels.max()) >= len(CLASSES):
        raise ValueError(f"{root / labels_name}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return FashionMNIST(images, labels, normalize=normalize)
