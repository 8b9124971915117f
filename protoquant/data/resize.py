"""A one-time downscaled copy of an image folder tree, so that caching decodes small files.

Decoding a 500 x 375 JPEG (CUB) or a 400 x 350 one (ImageNet, on average) only to resize it to
224 px spends most of the decode on pixels the transform throws away. `resize_dataset` writes a
copy of a tree with the same relative paths: every image whose shorter side exceeds
`shorter_side` is resized (aspect ratio kept, shorter side exactly `shorter_side`) and saved in
its own format (JPEG at `quality`, with its EXIF block and colour profile, so an orientation tag
still applies); smaller images and every other file are copied unchanged.

Every file of the copy is written atomically, so an interrupted run leaves whole files only (and temporary
ones, which the next run removes); run again, it keeps each one that is at least as new as its source and does the rest.

The copy is another dataset: its files differ, so its fingerprint and its feature caches
differ too. Annotations in pixels follow the images (`protoquant.data.resize_layouts`): the CUB
boxes and part centres, the Stanford Cars boxes, ImageNet's Kaggle box files and its VOC XML
files are rescaled image by image, and FunnyBirds' colour-coded part maps are resized by nearest
neighbour, so the copy loads, crops and scores like the original.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from protoquant import progress
from protoquant.atomic import clean_leftovers, write_bytes_atomic, write_file_atomic
from protoquant.data.images import DECODE_ERRORS, is_image_file, to_rgb
from protoquant.data.resize_layouts import LayoutRules, image_sizes, layout_rules
from protoquant.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

RESAMPLE = Image.Resampling.LANCZOS  # downscaling filter: the sharpest of Pillow's antialiased ones
LABEL_RESAMPLE = Image.Resampling.NEAREST  # label maps (part colours): every pixel keeps a label
QUALITY_RANGE = (1, 100)  # Pillow's JPEG / WebP quality scale
QUALITY_FORMATS = ("JPEG", "WEBP")  # formats saved at `quality`; the others are lossless
NEAREST_ONLY_MODES = ("1", "P", "PA")  # modes Pillow resizes only by nearest neighbour: made RGB first
SETTINGS_FILE = ".protoquant-resize.json"  # in the copy's folder: what it was written with


@dataclass(frozen=True)
class ResizeReport:
    """What `resize_dataset` did: images resized, images copied as they were, other files copied,
    files kept from an earlier run (already written and at least as new as their source), and
    annotation files rewritten in the copy's pixels."""

    resized: int
    copied: int
    other_files: int
    kept: int = 0
    annotations: int = 0


def resized_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side `shorter_side`, the longer scaled and truncated
    (the rounding of torchvision's resize to an int size)."""
    if width <= height:
        return shorter_side, int(shorter_side * height / width)
    return int(shorter_side * width / height), shorter_side


def resize_file(
    src: Path, dst: Path, shorter_side: int, quality: int, resample: Image.Resampling = RESAMPLE
) -> bool:
    """Write `src` to `dst` with its shorter side at most `shorter_side`; True if it was resized.

    `resample` is the filter (`LABEL_RESAMPLE` for label maps, which are resized in their own mode).

    Raises:
        DataError: `src` is not a readable image (the message names it).
    """
    try:
        with Image.open(src) as image:
            if min(image.size) <= shorter_side:
                copy_file(src, dst)
                return False
            image.load()
            fmt, info = image.format, image.info
            nearest_only = image.mode in NEAREST_ONLY_MODES and resample != LABEL_RESAMPLE
            source = to_rgb(image, src) if nearest_only else image
            resized = source.resize(resized_size(*image.size, shorter_side), resample)
    except DataError:
        raise
    except DECODE_ERRORS as err:
        raise DataError(f"cannot read image {src}: {type(err).__name__}: {err}") from err
    options = {k: info[k] for k in ("exif", "icc_profile") if info.get(k)}
    options |= {"quality": quality} if fmt in QUALITY_FORMATS else {}
    write_file_atomic(dst, lambda tmp: resized.save(tmp, format=fmt, **options), durable=False)
    return True


def copy_file(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` atomically (a whole file or none)."""
    write_file_atomic(dst, lambda tmp: shutil.copyfile(src, tmp), durable=False)


def is_done(src: Path, dst: Path) -> bool:
    """Whether `dst` was written by an earlier run after `src` last changed (written atomically,
    so an existing file is a whole one)."""
    try:
        return dst.stat().st_mtime_ns >= src.stat().st_mtime_ns
    except FileNotFoundError:
        return False


def _claim(dst: Path, shorter_side: int, quality: int) -> None:
    """Record the settings in `dst`, or check them against those of an earlier run there (a file
    it kept was written with them)."""
    settings = {"shorter_side": shorter_side, "quality": quality, "resample": RESAMPLE.name}
    path = dst / SETTINGS_FILE
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier != settings:
            raise ConfigError(
                f"resize: {dst} holds a copy written with {earlier} ({path}), not {settings}: "
                "choose another destination, or the same settings to finish that copy"
            )
        return
    dst.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, json.dumps(settings).encode())


def _check(src: Path, dst: Path, shorter_side: int, quality: int) -> None:
    if shorter_side < 1:
        raise ConfigError(f"shorter_side must be a positive number of pixels, got {shorter_side}")
    if not QUALITY_RANGE[0] <= quality <= QUALITY_RANGE[1]:
        raise ConfigError(f"quality must lie in {list(QUALITY_RANGE)}, got {quality}")
    if not src.is_dir():
        raise DataError(f"resize: source {src} is not a folder")
    if dst.resolve() == src.resolve() or dst.resolve().is_relative_to(src.resolve()):
        raise ConfigError(f"resize: destination {dst} must lie outside the source folder {src}")


@dataclass
class _Plan:
    """What a run writes, paths relative to the source: images, other files copied as they are,
    and per-image annotation files (with the image each annotates); how many files it keeps."""

    images: list[Path]
    others: list[Path]
    annotations: dict[Path, Path]
    kept: int


def _plan(src: Path, dst: Path, rules: LayoutRules) -> _Plan:
    """What to write of the tree `src`; the annotation files the layout rewrites as a whole are left
    out, and a per-image one is kept only when newer than its source and its image's copy, and that
    image is kept too."""
    images, others, annotations, kept = [], [], {}, 0
    for parent, dirs, names in os.walk(src):
        dirs.sort()
        target = dst / Path(parent).relative_to(src)
        if target.is_dir():
            clean_leftovers(target)  # partial files of a run that was killed
        for name in sorted(names):
            rel = (Path(parent) / name).relative_to(src)
            if rel in rules.rewritten:
                continue
            if (image := rules.annotates(rel)) is not None:
                annotations[rel] = image
            elif is_done(src / rel, dst / rel):
                kept += 1
            else:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                (images if is_image_file(name) else others).append(rel)
    written = set(images)
    for rel, image in list(annotations.items()):
        if image not in written and is_done(src / rel, dst / rel) and is_done(dst / image, dst / rel):
            del annotations[rel]
            kept += 1
    return _Plan(images, others, annotations, kept)


def _write(
    src: Path, dst: Path, plan: _Plan, rules: LayoutRules, shorter_side: int, quality: int, threads: int
) -> int:
    """Copy the plan's other files, then write its images and then its per-image annotation files
    on `threads` threads; returns how many images were resized."""
    for rel in plan.others:
        copy_file(src / rel, dst / rel)

    def one(rel: Path) -> bool:
        resample = LABEL_RESAMPLE if rules.label_image(rel) else RESAMPLE
        return resize_file(src / rel, dst / rel, shorter_side, quality, resample)

    def annotation(item: tuple[Path, Path]) -> None:
        rel, image = item
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        rules.rewrite_one(src / rel, dst / rel, image_sizes(src / image, dst / image))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        jobs = pool.map(one, plan.images)
        resized = sum(progress.bar(jobs, total=len(plan.images), desc=f"resizing {src.name}", unit="img"))
        steps = pool.map(annotation, plan.annotations.items())
        for _ in progress.bar(steps, total=len(plan.annotations), desc="annotations", unit="file"):
            pass
    return resized


def resize_dataset(
    src: str | Path, dst: str | Path, shorter_side: int, quality: int = 90, *, threads: int = 4
) -> ResizeReport:
    """Copy the tree `src` to `dst` (same relative paths) with large images downscaled.

    Annotations in pixels are rewritten for the copy once every image is written (see
    `protoquant.data.resize_layouts`); until then the copy has none, never stale ones.

    Args:
        src: the dataset folder.
        dst: the folder of the copy (created; a file already there is kept when it is at least as
            new as its source, e.g. after an interrupted run, and overwritten otherwise).
        shorter_side: the shorter side, in pixels, of every image larger than that.
        quality: JPEG / WebP quality of the resized images.
        threads: images processed at once (Pillow decodes, resizes and encodes outside the GIL).

    Raises:
        ConfigError: a bad `shorter_side` or `quality`, `dst` inside `src`, or `dst` holding a
            copy written with other settings.
        DataError: `src` is no folder, or an image there is unreadable (named).
    """
    src, dst = Path(src), Path(dst)
    _check(src, dst, shorter_side, quality)
    _claim(dst, shorter_side, quality)
    rules = layout_rules(src)
    for rel in rules.rewritten:
        (dst / rel).unlink(missing_ok=True)  # rewritten below, from the images as they will be
    plan = _plan(src, dst, rules)
    resized = _write(src, dst, plan, rules, shorter_side, quality, threads)
    rules.rewrite(src, dst)
    report = ResizeReport(
        resized,
        len(plan.images) - resized,
        len(plan.others),
        plan.kept,
        len(rules.rewritten) + len(plan.annotations),
    )
    logger.info(
        "%s -> %s: %d images resized, %d copied, %d other files, %d kept, %d annotation files rewritten",
        src,
        dst,
        *vars(report).values(),
    )
    return report
