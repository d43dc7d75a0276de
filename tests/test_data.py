"""Fashion-MNIST loader: the real files (published counts and balance) and every way a file can be wrong."""

import gzip
import struct

import pytest
import torch

from sepconv.data import APT_PACKAGE, MEAN, STD, fashion_mnist


@pytest.fixture(scope="module")
def test_split():
    return fashion_mnist("test")


def test_real_splits_match_the_published_description(test_split) -> None:
    train = fashion_mnist("train", normalize=False)
    assert len(train) == 60_000 and len(test_split) == 10_000
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test_split.labels).tolist() == [1000] * 10
    assert train.images.shape == (60_000, 1, 28, 28) and train.images.min() >= 0 and train.images.max() <= 1
    assert train.images.mean().item() == pytest.approx(MEAN, abs=5e-4)
    assert train.images.std().item() == pytest.approx(STD, abs=5e-4)
    image, label = test_split[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and isinstance(label, int)


def write_idx(path, magic: bytes, dims: tuple[int, ...], payload: bytes) -> None:
    with gzip.open(path, "wb") as file:
        file.write(magic + struct.pack(f">{len(dims)}I", *dims) + payload)


def fake_split(root, *, images=None, labels=None, count=10_000) -> None:
    write_idx(root / "t10k-images-idx3-ubyte.gz", b"\x00\x00\x08\x03", (count, 28, 28), bytes(count * 784))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", b"\x00\x00\x08\x01", (count,), bytes(count))
    if images:
        images(root / "t10k-images-idx3-ubyte.gz")
    if labels:
        labels(root / "t10k-labels-idx1-ubyte.gz")


def test_a_well_formed_fake_split_loads(tmp_path) -> None:
    fake_split(tmp_path)
    assert len(fashion_mnist("test", root=tmp_path)) == 10_000


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (lambda p: write_idx(p, b"\x00\x00\x08\x01", (10_000, 28, 28), b""), None, "bad IDX magic"),
        (
            lambda p: write_idx(p, b"\x00\x00\x08\x03", (9_999, 28, 28), bytes(9_999 * 784)),
            None,
            r"header says shape \(9999, 28, 28\), expected \(10000, 28, 28\)",
        ),
        (lambda p: write_idx(p, b"\x00\x00\x08\x03", (10_000, 28, 28), bytes(784)), None, "truncated or padded"),
        (
            lambda p: write_idx(p, b"\x00\x00\x08\x03", (10_000, 28, 28), bytes(10_000 * 784 + 1)),
            None,
            "truncated or padded",
        ),
        (lambda p: p.write_bytes(p.read_bytes()[:5000]), None, "not a readable gzip file"),
        (None, lambda p: write_idx(p, b"\x00\x00\x08\x01", (10_000,), bytes([10]) * 10_000), "label 10 outside 0..9"),
        (None, lambda p: p.write_bytes(b"\x00\x01"), "not a readable gzip file"),
    ],
)
def test_corrupt_files_raise_clear_errors(tmp_path, images, labels, message) -> None:
    fake_split(tmp_path, images=images, labels=labels)
    with pytest.raises(ValueError, match=message):
        fashion_mnist("test", root=tmp_path)


def test_missing_files_name_the_apt_package(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=f"apt-get install {APT_PACKAGE}"):
        fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split must be one of 'train', 'test'; got 'val'"):
        fashion_mnist("val")
