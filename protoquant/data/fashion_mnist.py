"""Fashion-MNIST from its IDX files (as the Debian package `dataset-fashion-mnist` installs them)."""

from __future__ import annotations

import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
from PIL import Image

from protoquant.data.base import ImageDataset, stable_hash

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian package location
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_IMAGES_MAGIC = 2051
IDX_LABELS_MAGIC = 2049


def _open(root: Path, stem: str) -> tuple[Path, bytes]:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            raw = candidate.read_bytes()
            if candidate.suffix != ".gz":
                return candidate, raw
            try:
                return candidate, gzip.decompress(raw)
            except (EOFError, OSError) as err:
                raise ValueError(f"{candidate}: truncated or corrupt gzip file ({err})") from err
    raise FileNotFoundError(f"Fashion-MNIST file {stem}[.gz] not found in {root}")


def read_idx(root: Path, stem: str, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a uint8 array, validating its header."""
    path, raw = _open(root, stem)
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated IDX header")
    found, count = struct.unpack(">II", raw[:8])
    if found != magic:
        raise ValueError(f"{path}: IDX magic {found}, expected {magic}")
    dims = [count]
    offset = 8
    if magic == IDX_IMAGES_MAGIC:
        if len(raw) < 16:
            raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, images need 16)")
        dims += list(struct.unpack(">II", raw[8:16]))
        offset = 16
    expected = int(np.prod(dims))
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != expected:
        raise ValueError(f"{path}: {data.size} bytes of data, header promises {expected}")
    return data.reshape(dims)


class FashionMNIST(ImageDataset):
    """Fashion-MNIST split ("train" 60k or "test" 10k); 28x28 grayscale returned as RGB."""

    name = "fashion-mnist"

    def __init__(self, root: str | Path = DEFAULT_ROOT, split: str = "train") -> None:
        if split not in FILES:
            raise ValueError(f"Fashion-MNIST split must be one of {list(FILES)}, got '{split}'")
        self.root = Path(root or DEFAULT_ROOT)
        self.split = split
        images_stem, labels_stem = FILES[split]
        self.images = read_idx(self.root, images_stem, IDX_IMAGES_MAGIC)  # (N, 28, 28) uint8
        self.labels = read_idx(self.root, labels_stem, IDX_LABELS_MAGIC).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{self.root}: {len(self.images)} images but {len(self.labels)} labels ({split})"
            )
        if self.labels.size and self.labels.max() >= len(CLASSES):
            raise ValueError(f"{self.root}/{labels_stem}: label {self.labels.max()} outside 0..9")
        self.classes = CLASSES

    def load_image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index], mode="L").convert("RGB")

    def fingerprint(self) -> str:
        images = hashlib.sha256(self.images.tobytes()).hexdigest()
        labels = hashlib.sha256(self.labels.tobytes()).hexdigest()
        return stable_hash({"name": self.name, "split": self.split, "images": images, "labels": labels})
