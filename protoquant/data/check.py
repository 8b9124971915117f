"""`protoquant data check`: verify a copy of a dataset and summarise it.

`check_dataset` never raises for a bad copy: everything wrong (a missing annotation file, an
id mismatch, a missing, truncated or unreadable image, a box outside its image, files a loader
left out) becomes one human-readable line in `problems`, naming the file and line where known.
The counts are those of the whole official splits, with val the given val split or carved from
train exactly as `load_splits` carves it; the per-class caps (`max_*_per_class`) are ignored, so
every image is checked. `dataset: auto` is reported as the layout it resolves to.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from protoquant import progress
from protoquant.config import DataConfig
from protoquant.data import given_splits, load_dataset, resolve_dataset
from protoquant.data.base import ImageDataset
from protoquant.data.splits import stratified_split

MAX_PROBLEMS = 1000  # problems listed one by one; the rest are counted in a final line
MAX_THREADS = 8  # image-decoding threads (Pillow releases the GIL while decoding)
CHECK_SEED = 0  # val sizes per class do not depend on the seed, only membership does
LOAD_ERRORS = (OSError, ValueError, IndexError, KeyError, EOFError)  # what a bad copy raises


def _image_problems(dataset: ImageDataset, index: int) -> list[str]:
    """Problems of image `index`: unreadable, or annotations inconsistent with the image."""
    try:
        image = dataset.load_image(index)
        parts = dataset.annotations(index)
    except LOAD_ERRORS as err:
        return [str(err)]
    if parts is None:
        return []
    where = f"image {index}" + (f" ({dataset.image_path(index)})" if hasattr(dataset, "image_path") else "")
    problems = []
    count = len(parts.part_names)
    if parts.keypoints.shape != (count, 2) or parts.visible.shape != (count,):
        problems.append(
            f"{where}: keypoints {parts.keypoints.shape} / visible {parts.visible.shape} for {count} parts"
        )
    if parts.masks is not None and parts.masks.shape != (count, image.height, image.width):
        problems.append(
            f"{where}: part masks {parts.masks.shape[1:]} do not match the image {image.height}x{image.width}"
        )
    if parts.box is not None:
        x1, y1, x2, y2 = (float(v) for v in parts.box)
        if not (0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height):
            problems.append(
                f"{where}: box {parts.box.tolist()} outside the {image.width}x{image.height} image"
            )
    return problems


def _missing_files(dataset: ImageDataset) -> list[str]:
    if not hasattr(dataset, "image_path"):
        return []
    paths = (dataset.image_path(i) for i in range(len(dataset)))
    return [
        f"image file {p} not found"
        for p in progress.bar(paths, total=len(dataset), desc=f"check {dataset.split}: files", unit="file")
        if not p.is_file()
    ]


def _verify(dataset: ImageDataset, split: str) -> list[str]:
    """Decode every image of `dataset` (threaded) and collect its problems in index order."""
    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1))
    with ThreadPoolExecutor(threads) as pool:
        found = pool.map(lambda i: _image_problems(dataset, i), range(len(dataset)))
        return [
            p
            for ps in progress.bar(found, total=len(dataset), desc=f"check {split}: images", unit="img")
            for p in ps
        ]


def _has_boxes(datasets: list[ImageDataset]) -> bool:
    for dataset in datasets:
        if hasattr(dataset, "has_boxes"):
            return bool(dataset.has_boxes)
        if len(dataset):
            try:
                parts = dataset.annotations(0)
            except LOAD_ERRORS:
                continue  # reported by the image checks
            return parts is not None and parts.box is not None
    return False


def _load(config: DataConfig, problems: list[str]) -> dict[str, ImageDataset]:
    try:
        splits = given_splits(config)
    except LOAD_ERRORS as err:
        problems.append(f"layout: {err}")
        return {}
    loaded = {}
    for split in splits:
        try:
            loaded[split] = load_dataset(config, split)
        except LOAD_ERRORS as err:
            problems.append(f"{split}: {err}")
    return loaded


def _split_sizes(loaded: dict[str, ImageDataset], config: DataConfig, problems: list[str]) -> dict:
    """Image counts of train, val (given, or carved as `load_splits` carves it) and test."""
    sizes = {split: len(loaded[split]) if split in loaded else 0 for split in ("train", "val", "test")}
    if "train" in loaded and "val" not in loaded:
        try:
            kept, held = stratified_split(loaded["train"].labels, config.val_fraction, CHECK_SEED)
            sizes["train"], sizes["val"] = len(kept), len(held)
        except ValueError as err:
            problems.append(f"train: {err}")
    for split in ("val", "test"):
        if "train" in loaded and split in loaded and loaded["train"].classes != loaded[split].classes:
            problems.append(f"train and {split} splits list different classes")
    return sizes


def check_dataset(config: DataConfig, *, verify_images: bool = True) -> dict[str, Any]:
    """Verify the dataset named in `config` and return the `data check --json` report.

    Args:
        config: the data section (dataset, root, val_fraction, crop_to_box, split_file).
        verify_images: decode every image and check its annotations against it (slow on big
            sets); otherwise only check that every image file exists.

    Returns:
        {"dataset", "num_classes", "splits": {"train", "val", "test"}, "has_parts",
        "has_boxes", "problems": [str, ...]}.
    """
    problems: list[str] = []
    try:
        config = resolve_dataset(config)
    except LOAD_ERRORS as err:
        problems.append(f"data.root: {err}")
    loaded = _load(config, problems) if not problems else {}
    splits = _split_sizes(loaded, config, problems)
    for split, dataset in loaded.items():
        problems += [f"{split}: {note}" for note in getattr(dataset, "skipped", ())]
        found = _verify(dataset, split) if verify_images else _missing_files(dataset)
        problems += [f"{split}: {p}" for p in found]
    if len(problems) > MAX_PROBLEMS:
        problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
    datasets = list(loaded.values())
    return {
        "dataset": config.dataset,
        "num_classes": datasets[0].num_classes if datasets else 0,
        "splits": splits,
        "has_parts": any(d.has_parts for d in datasets),
        "has_boxes": _has_boxes(datasets),
        "problems": problems,
    }


def format_check(report: dict[str, Any]) -> str:
    """The human-readable summary of a `check_dataset` report."""
    splits = report["splits"]
    lines = [
        f"dataset {report['dataset']}: {report['num_classes']} classes, "
        f"parts {'yes' if report['has_parts'] else 'no'}, boxes {'yes' if report['has_boxes'] else 'no'}",
        f"images: train {splits['train']}, val {splits['val']}, test {splits['test']}",
    ]
    problems = report["problems"]
    if not problems:
        lines.append("no problems found")
    else:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  - {p}" for p in problems]
    return "\n".join(lines)
