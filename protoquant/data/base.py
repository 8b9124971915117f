"""The one dataset interface every image source implements.

A dataset is an indexable collection of RGB images with integer labels. Where the
source has them, it also exposes part keypoints, part masks and an object box
(`PartAnnotations`), all in the pixel coordinates of the image that `load_image`
returns. `fingerprint()` identifies the exact content so the feature cache can tell
when it is stale.
"""

from __future__ import annotations

import abc
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class PartAnnotations:
    """Ground-truth parts of one image, in the pixels of `ImageDataset.load_image(i)`.

    Attributes:
        part_names: P part names, the same tuple for every image of a dataset.
        keypoints: (P, 2) float32 part centres as (x, y); undefined where not visible.
        visible: (P,) bool, whether each part is visible in this image.
        box: (4,) float32 object box (x1, y1, x2, y2), or None where the source has none.
        masks: (P, H, W) bool part masks, or None where the source has none.
    """

    part_names: tuple[str, ...]
    keypoints: np.ndarray
    visible: np.ndarray
    box: np.ndarray | None = None
    masks: np.ndarray | None = None


@dataclass(frozen=True)
class ImageFile:
    """The file that `ImageDataset.load_image` decodes whole, uncropped, for other decoders.

    Attributes:
        path: the image file.
        orient: whether `load_image` applies the file's EXIF orientation tag.
    """

    path: Path
    orient: bool


def stable_hash(payload: Any) -> str:
    """sha256 hex digest of a JSON-serialisable payload (key order independent)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def display_name(name: str) -> str:
    r"""A file or folder name as text: valid UTF-8 unchanged, undecodable bytes as visible escapes.

    `os.fsdecode` keeps undecodable bytes as lone surrogates, which no text encoder accepts
    ("caf\udce9" for the bytes b"caf\xe9"); shown here as "caf\xe9", the way Python prints bytes.
    """
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def display_names(names: Sequence[str], where: str) -> tuple[str, ...]:
    """`display_name` of every name; raises ValueError where two names read the same."""
    shown = tuple(display_name(n) for n in names)
    if len(set(shown)) != len(shown):
        twins = sorted({s for s in shown if shown.count(s) > 1})
        raise ValueError(f"{where}: class folders named {twins[0]!r} read alike once bytes are escaped")
    return shown


class ImageDataset(abc.ABC):
    """Abstract image dataset: RGB PIL images, integer labels, optional part ground truth.

    Subclasses set `name`, `split`, `classes` (class names in label order) and
    `labels` ((N,) int64 array), and implement `load_image` and `fingerprint`.
    """

    name: str
    split: str
    classes: tuple[str, ...]
    labels: np.ndarray

    def __len__(self) -> int:
        return int(len(self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @abc.abstractmethod
    def load_image(self, index: int) -> Image.Image:
        """Image `index` as an RGB PIL image."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """Hex digest that changes whenever any image, label or the split changes."""

    def annotations(self, index: int) -> PartAnnotations | None:
        """Part ground truth of image `index`, or None where the dataset has none."""
        return None

    def image_file(self, index: int) -> ImageFile | None:
        """The file image `index` is decoded from as a whole (no crop, no drawing), else None.

        Decoders outside `load_image` (batched JPEG decoding on the device) read only such
        files; every other image keeps going through `load_image`.
        """
        return None

    @property
    def has_parts(self) -> bool:
        return False

    def subset(self, indices: Sequence[int]) -> SubsetDataset:
        """A view of this dataset restricted to `indices` (in the given order)."""
        return SubsetDataset(self, indices)


class SubsetDataset(ImageDataset):
    """Rows `indices` of a parent dataset; labels, images and annotations delegate to it."""

    def __init__(self, parent: ImageDataset, indices: Sequence[int]) -> None:
        self.parent = parent
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= len(parent)):
            raise IndexError(f"subset indices must lie in [0, {len(parent)}) for {parent.name}")
        self.name = parent.name
        self.split = parent.split
        self.classes = parent.classes
        self.labels = parent.labels[self.indices]

    def load_image(self, index: int) -> Image.Image:
        return self.parent.load_image(int(self.indices[index]))

    def annotations(self, index: int) -> PartAnnotations | None:
        return self.parent.annotations(int(self.indices[index]))

    def image_file(self, index: int) -> ImageFile | None:
        return self.parent.image_file(int(self.indices[index]))

    @property
    def has_parts(self) -> bool:
        return self.parent.has_parts

    def fingerprint(self) -> str:
        return stable_hash({"parent": self.parent.fingerprint(), "indices": self.indices.tolist()})
