"""Device decoding's batches crossing from the DataLoader workers to the main process: the files'
bytes as one tensor per batch (`collate_views` now) against one tensor per file (as before), side
by side.

The workers of both read the same JPEG files (`DeviceDecodeViews`: the bytes and each view's
geometry, no decoding); the main process only receives the batches. A tensor crosses by a
shared-memory handle each, so one per file costs the main process, which also drives the
backbone, a handle per image. Prints the median milliseconds per batch over `--rounds`
alternating rounds.

    python benchmarks/batch_transfer.py [--images 1024] [--batch 128] [--workers 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine
from PIL import Image
from torch.utils.data import DataLoader

from protoquant.cache.decode import DeviceDecodeViews, EncodedView, collate_views
from protoquant.data.image_folder import ImageFolder
from protoquant.data.transforms import ViewTransform


def write_jpegs(root: Path, count: int) -> ImageFolder:
    """`count` noisy 500 x 375 JPEG files (about 60 kB each, like ImageNet's) in two classes."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
    for i in range(count):
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.roll(base, i, axis=1)).save(folder / f"{i:05d}.jpg", quality=75)
    return ImageFolder(root, "train")


def per_file(items: list[EncodedView]) -> list[EncodedView]:
    """The former batches: each item's bytes a tensor of its own."""
    return items


def seconds_per_batch(views: DeviceDecodeViews, collate, args: argparse.Namespace) -> float:
    loader = DataLoader(views, batch_size=args.batch, num_workers=args.workers, collate_fn=collate)
    batches = iter(loader)
    next(batches)  # workers started and warm
    start, count = time.perf_counter(), 0
    for _ in batches:
        count += 1
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.images < 2 * args.batch:  # the first batch only warms the workers up
        parser.error(f"--images must be at least 2 x --batch = {2 * args.batch} (got {args.images})")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = write_jpegs(Path(tmp), args.images)
        views = DeviceDecodeViews(dataset, ViewTransform(224, 0.875, (0.5,) * 3, (0.5,) * 3), views=1)
        kinds = {"one tensor per batch (now)": collate_views, "one tensor per file (before)": per_file}
        times: dict[str, list[float]] = {name: [] for name in kinds}
        for _ in range(args.rounds):
            for name, collate in kinds.items():
                times[name].append(seconds_per_batch(views, collate, args))
    print(f"machine: {machine()}")
    print(
        f"{args.images} JPEG files of 500 x 375, batch {args.batch}, {args.workers} workers, {args.rounds} rounds"
    )
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name}: {value * 1e3:.1f} ms per batch")
    now, before = medians.values()
    print(f"before / now: {before / now:.2f}x")


if __name__ == "__main__":
    main()
