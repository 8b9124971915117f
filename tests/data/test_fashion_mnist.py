"""Fashion-MNIST IDX reader on tiny files written in the official layout."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from protoquant.data.fashion_mnist import CLASSES, DEFAULT_ROOT, FashionMNIST

N_TRAIN, N_TEST = 7, 3


def _idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    count, rows, cols = images.shape
    return struct.pack(">IIII", magic, count, rows, cols) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">II", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def _write(root: Path, stem: str, data: bytes, gzipped: bool) -> Path:
    path = root / (f"{stem}.gz" if gzipped else stem)
    path.write_bytes(gzip.compress(data) if gzipped else data)
    return path


def _arrays(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=count)


@pytest.fixture(params=[True, False], ids=["gz", "raw"])
def root(tmp_path, request) -> Path:
    """A folder with the four official files, gzipped or not."""
    gzipped = request.param
    for stems, count, seed in [
        (("train-images-idx3-ubyte", "train-labels-idx1-ubyte"), N_TRAIN, 0),
        (("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"), N_TEST, 1),
    ]:
        images, labels = _arrays(count, seed)
        _write(tmp_path, stems[0], _idx_images(images), gzipped)
        _write(tmp_path, stems[1], _idx_labels(labels), gzipped)
    return tmp_path


@pytest.mark.parametrize(("split", "count", "seed"), [("train", N_TRAIN, 0), ("test", N_TEST, 1)])
def test_reads_images_and_labels(root, split, count, seed) -> None:
    images, labels = _arrays(count, seed)
    dataset = FashionMNIST(root, split)
    assert len(dataset) == count and dataset.split == split
    assert dataset.classes == CLASSES and dataset.num_classes == 10
    assert dataset.labels.dtype == np.int64 and np.array_equal(dataset.labels, labels)
    for i in range(count):
        image = dataset.load_image(i)
        assert image.mode == "RGB" and image.size == (28, 28)
        pixels = np.asarray(image)
        assert all(np.array_equal(pixels[..., c], images[i]) for c in range(3))


def test_fingerprint_depends_on_content_and_split(root, tmp_path_factory) -> None:
    train, test = FashionMNIST(root, "train"), FashionMNIST(root, "test")
    assert train.fingerprint() == FashionMNIST(root, "train").fingerprint()
    assert train.fingerprint() != test.fingerprint()
    other = tmp_path_factory.mktemp("other")
    images, labels = _arrays(N_TRAIN, 0)
    images[0, 0, 0] ^= 1
    _write(other, "train-images-idx3-ubyte", _idx_images(images), False)
    _write(other, "train-labels-idx1-ubyte", _idx_labels(labels), False)
    assert FashionMNIST(other, "train").fingerprint() != train.fingerprint()


def test_unknown_split_raises(root) -> None:
    with pytest.raises(ValueError, match="split"):
        FashionMNIST(root, "val")


def test_missing_file_names_it(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        FashionMNIST(tmp_path, "train")


def _broken_root(
    tmp_path: Path, images_bytes: bytes, *, gzipped: bool = False, raw_images: bool = False
) -> Path:
    """Valid labels; the images file holds `images_bytes` (gzipped unless raw_images)."""
    _, labels = _arrays(N_TRAIN, 0)
    _write(tmp_path, "train-labels-idx1-ubyte", _idx_labels(labels), False)
    path = tmp_path / ("train-images-idx3-ubyte.gz" if gzipped else "train-images-idx3-ubyte")
    path.write_bytes(images_bytes if raw_images or not gzipped else gzip.compress(images_bytes))
    return path


@pytest.mark.parametrize("gzipped", [True, False])
def test_bad_magic_raises_naming_the_file(tmp_path, gzipped) -> None:
    images, _ = _arrays(N_TRAIN, 0)
    path = _broken_root(tmp_path, _idx_images(images, magic=2049), gzipped=gzipped)
    with pytest.raises(ValueError, match=path.name):
        FashionMNIST(tmp_path, "train")


@pytest.mark.parametrize("gzipped", [True, False])
@pytest.mark.parametrize("keep", [4, 100, -1])
def test_truncated_data_raises_naming_the_file(tmp_path, gzipped, keep) -> None:
    images, _ = _arrays(N_TRAIN, 0)
    path = _broken_root(tmp_path, _idx_images(images)[:keep], gzipped=gzipped)
    with pytest.raises(ValueError, match=path.name):
        FashionMNIST(tmp_path, "train")


def test_label_count_mismatch_raises(tmp_path) -> None:
    images, _ = _arrays(N_TRAIN + 1, 0)
    _broken_root(tmp_path, _idx_images(images))
    with pytest.raises(ValueError, match="labels"):
        FashionMNIST(tmp_path, "train")


def test_label_out_of_range_raises(tmp_path) -> None:
    images, labels = _arrays(N_TRAIN, 0)
    labels[2] = 10
    _write(tmp_path, "train-images-idx3-ubyte", _idx_images(images), False)
    _write(tmp_path, "train-labels-idx1-ubyte", _idx_labels(labels), False)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
        FashionMNIST(tmp_path, "train")


def test_truncated_image_header_raises_value_error(tmp_path) -> None:
    images, _ = _arrays(N_TRAIN, 0)
    path = _broken_root(tmp_path, _idx_images(images)[:12])
    with pytest.raises(ValueError, match=path.name):
        FashionMNIST(tmp_path, "train")


def test_truncated_gzip_raises_value_error(tmp_path) -> None:
    images, _ = _arrays(N_TRAIN, 0)
    compressed = gzip.compress(_idx_images(images))
    path = _broken_root(tmp_path, compressed[: len(compressed) // 2], gzipped=True, raw_images=True)
    with pytest.raises(ValueError, match=path.name):
        FashionMNIST(tmp_path, "train")


@pytest.mark.skipif(not Path(DEFAULT_ROOT).is_dir(), reason="Debian dataset-fashion-mnist is not installed")
def test_installed_test_split_reads() -> None:
    dataset = FashionMNIST(split="test")
    assert len(dataset) == 10_000 and dataset.images.shape == (10_000, 28, 28)
    assert np.array_equal(np.bincount(dataset.labels), np.full(10, 1000))
    assert dataset.load_image(0).mode == "RGB"
