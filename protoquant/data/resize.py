"""A one-time downscaled copy of an image folder tree, so that caching decodes small files.

Decoding a 500 x 375 JPEG (CUB) or a 400 x 350 one (ImageNet, on average) only to resize it to
224 px spends most of the decode on pixels the transform throws away. `resize_dataset` writes a
copy of a tree with the same relative paths: every image whose shorter side exceeds
`shorter_side` is resized (aspect ratio kept, shorter side exactly `shorter_side`) and saved in
its own format (JPEG at `quality`, with its EXIF block and colour profile, so an orientation tag
still applies); smaller images and every other file are copied unchanged.

The copy is another dataset: its files differ, so its fingerprint and its feature caches
differ too. Annotations given in pixel coordinates (the CUB and Stanford Cars boxes and parts)
are not rescaled: use the copy with layouts that have none (image folders, ImageNet).
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from protoquant import progress
from protoquant.atomic import write_file_atomic
from protoquant.data.images import DECODE_ERRORS, is_image_file, to_rgb
from protoquant.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

RESAMPLE = Image.Resampling.LANCZOS  # downscaling filter: the sharpest of Pillow's antialiased ones
QUALITY_RANGE = (1, 100)  # Pillow's JPEG / WebP quality scale
QUALITY_FORMATS = ("JPEG", "WEBP")  # formats saved at `quality`; the others are lossless
NEAREST_ONLY_MODES = ("1", "P", "PA")  # modes Pillow resizes only by nearest neighbour: made RGB first


@dataclass(frozen=True)
class ResizeReport:
    """What `resize_dataset` wrote: images resized, images copied as they were, other files copied."""

    resized: int
    copied: int
    other_files: int


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shorter_side`, the longer scaled and truncated
    (the rounding of torchvision's resize to an int size)."""
    if width <= height:
        return shorter_side, int(shorter_side * height / width)
    return int(shorter_side * width / height), shorter_side


def resize_file(src: Path, dst: Path, shorter_side: int, quality: int) -> bool:
    """Write `src` to `dst` with its shorter side at most `shorter_side`; True if it was resized.

    Raises:
        DataError: `src` is not a readable image (the message names it).
    """
    try:
        with Image.open(src) as image:
            if min(image.size) <= shorter_side:
                shutil.copyfile(src, dst)
                return False
            image.load()
            fmt, info = image.format, image.info
            source = to_rgb(image, src) if image.mode in NEAREST_ONLY_MODES else image
            resized = source.resize(resized_size(*image.size, shorter_side), RESAMPLE)
    except DataError:
        raise
    except DECODE_ERRORS as err:
        raise DataError(f"cannot read image {src}: {type(err).__name__}: {err}") from err
    options = {k: info[k] for k in ("exif", "icc_profile") if info.get(k)}
    options |= {"quality": quality} if fmt in QUALITY_FORMATS else {}
    write_file_atomic(dst, lambda tmp: resized.save(tmp, format=fmt, **options), durable=False)
    return True


def _check(src: Path, dst: Path, shorter_side: int, quality: int) -> None:
    if shorter_side < 1:
        raise ConfigError(f"shorter_side must be a positive number of pixels, got {shorter_side}")
    if not QUALITY_RANGE[0] <= quality <= QUALITY_RANGE[1]:
        raise ConfigError(f"quality must lie in {list(QUALITY_RANGE)}, got {quality}")
    if not src.is_dir():
        raise DataError(f"resize: source {src} is not a folder")
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"resize: destination {dst} must lie outside the source folder {src}")


def resize_dataset(
    src: str | Path, dst: str | Path, shorter_side: int, quality: int = 90, *, threads: int = 4
) -> ResizeReport:
    """Copy the tree `src` to `dst` (same relative paths) with large images downscaled.

    Args:
        src: the dataset folder.
        dst: the folder of the copy (created; files already there are overwritten).
        shorter_side: the shorter side, in pixels, of every image larger than that.
        quality: JPEG / WebP quality of the resized images.
        threads: images processed at once (Pillow decodes, resizes and encodes outside the GIL).

    Raises:
        ConfigError: a bad `shorter_side` or `quality`, or `dst` inside `src`.
        DataError: `src` is no folder, or an image there is unreadable (named).
    """
    src, dst = Path(src), Path(dst)
    _check(src, dst, shorter_side, quality)
    images, others = [], []
    for parent, dirs, names in os.walk(src):
        dirs.sort()
        for name in sorted(names):
            rel = (Path(parent) / name).relative_to(src)
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (images if is_image_file(name) else others).append(rel)
    for rel in others:
        shutil.copyfile(src / rel, dst / rel)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = pool.map(lambda rel: resize_file(src / rel, dst / rel, shorter_side, quality), images)
        resized = sum(progress.bar(jobs, total=len(images), desc=f"resizing {src.name}", unit="img"))
    report = ResizeReport(resized, len(images) - resized, len(others))
    logger.info("%s -> %s: %d images resized, %d copied, %d other files", src, dst, *vars(report).values())
    return report
