"""The gallery's pictures: window crops of its training patches and thumbnails of each prototype's
source image, cut once when the gallery is built and stored in the checkpoint folder.

With them `explain`, `predict` and the report show "that" on a machine without the training data.
They are stored as `gallery_pictures.zip`, one JPEG per picture (small: the patches of natural and
noisy images hardly compress losslessly), written atomically; `gallery.json` records its sha256,
so a torn or foreign file is refused.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from protoquant import progress
from protoquant.data import ImageDataset
from protoquant.data.base import SubsetDataset
from protoquant.data.transforms import ViewTransform
from protoquant.explain.types import SOURCE_SIDE, GalleryPictures, window_crop
from protoquant.gallery_files import GALLERY_PICTURES

JPEG_QUALITY = 90  # of the stored pictures: no visible loss at a tenth of the raw size


def to_uint8(normalised: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, S, S) normalised tensor -> (S, S, 3) uint8 image."""
    pixels = normalised.detach().cpu().float().numpy().transpose(1, 2, 0)  # (S, S, 3)
    unit = np.clip(pixels * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32), 0, 1)
    return (unit * 255).round().astype(np.uint8)


def image_file(dataset: ImageDataset, index: int) -> str:
    """The file of image `index` relative to its dataset's root, or "" where it has none (generated)."""
    while isinstance(dataset, SubsetDataset):
        dataset, index = dataset.parent, int(dataset.indices[index])
    files = getattr(dataset, "files", None)
    return str(files[index]) if files is not None else ""


def cut_pictures(
    dataset: ImageDataset,
    image: torch.Tensor,
    cell: torch.Tensor,
    grid: tuple[int, int],
    transform: ViewTransform,
) -> GalleryPictures:
    """Window crops of every gallery patch and a thumbnail of each prototype's rank-0 image.

    Args:
        image, cell: (K, T) training image index and flat cell h * W + w of each patch.
        transform: the cache's transform; view 0 is what the gallery's features saw.
    """
    views: dict[int, np.ndarray] = {}
    wanted = sorted(set(image.flatten().tolist()))
    for index in progress.bar(wanted, desc="gallery: pictures", unit="image"):
        tensor = transform(dataset.load_image(index).convert("RGB"), index, 0)  # (3, S, S)
        views[index] = to_uint8(tensor, transform.mean, transform.std)
    num_prototypes, top_k = image.shape
    crops = np.stack(
        [
            window_crop(views[int(image[k, t])], divmod(int(cell[k, t]), grid[1]), grid)[0]
            for k in range(num_prototypes)
            for t in range(top_k)
        ]
    )  # (K * T, c, c, 3)
    sources = np.stack(
        [_thumbnail(views[int(image[k, 0])], SOURCE_SIDE) for k in range(num_prototypes)]
    )  # (K, s, s, 3)
    return GalleryPictures(crops.reshape(num_prototypes, top_k, *crops.shape[1:]), sources)


def _thumbnail(view: np.ndarray, side: int) -> np.ndarray:
    return np.asarray(Image.fromarray(view).resize((side, side), Image.Resampling.BICUBIC))


def _jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def save_pictures(pictures: GalleryPictures, folder: Path) -> str:
    """Write GALLERY_PICTURES into `folder` atomically; returns its sha256."""
    buffer = io.BytesIO()
    num_prototypes, top_k = pictures.crops.shape[:2]
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for k in range(num_prototypes):
            archive.writestr(f"source-{k}.jpg", _jpeg(pictures.sources[k]))
            for t in range(top_k):
                archive.writestr(f"crop-{k}-{t}.jpg", _jpeg(pictures.crops[k, t]))
    data = buffer.getvalue()
    tmp = folder / f".{GALLERY_PICTURES}.tmp-{os.getpid()}"
    tmp.write_bytes(data)
    os.replace(tmp, folder / GALLERY_PICTURES)
    return hashlib.sha256(data).hexdigest()


def load_pictures(folder: Path, sha256: str, shape: tuple[int, int]) -> GalleryPictures:
    """Read GALLERY_PICTURES of a (K, T) gallery from `folder`, refusing a file whose hash is not `sha256`."""
    path = folder / GALLERY_PICTURES
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; rebuild the gallery with `protoquant gallery --model {folder}`"
        )
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError(f"{path} does not match gallery.json; rebuild the gallery")
    num_prototypes, top_k = shape
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        sources = np.stack([_pixels(archive.read(f"source-{k}.jpg")) for k in range(num_prototypes)])
        crops = np.stack(
            [_pixels(archive.read(f"crop-{k}-{t}.jpg")) for k in range(num_prototypes) for t in range(top_k)]
        )  # (K * T, c, c, 3)
    return GalleryPictures(crops.reshape(num_prototypes, top_k, *crops.shape[1:]), sources)
