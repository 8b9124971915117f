"""What verifying a feature cache costs: the checksum pass on first open, then stat-only opens.

Writes a complete cache of random float16 maps (7x7x1280, shards of 512, the library's own
shard writer) into a temporary folder, deleted afterwards, then times `FeatureStore(folder)`:
  - first open, files in the page cache (sha256 of every file: the hashing rate itself);
  - first open, files evicted from the page cache (posix_fadvise DONTNEED: disk + hashing);
  - stamped open (verified.json: one os.stat per file), as a new process sees it.
and scales both to a 1.28M-image ImageNet cache with 2 views.

    python benchmarks/cache_verify.py [--gigabytes 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from common import machine

from protoquant.cache import verify
from protoquant.cache.files import shard_paths
from protoquant.cache.store import FeatureStore
from protoquant.cache.synthetic import write_cache

GRID, CHANNELS, SHARD = (7, 7), 1280, 512
IMAGENET_IMAGES, IMAGENET_VIEWS = 1_281_167, 2
AGE_NS = 3600 * 10**9  # files made older than the racy window, as a cache built earlier is


def fake_cache(folder: Path, gigabytes: float) -> FeatureStore:
    """A complete cache of about `gigabytes` of float16 feature shards (random, distinct)."""
    rng = np.random.default_rng(0)
    per_entry = np.prod(GRID) * CHANNELS * 2
    shards = max(1, int(gigabytes * 1e9 // (per_entry * SHARD)))
    block = rng.random((SHARD, *GRID, CHANNELS), dtype=np.float32).astype(np.float16)  # (n, H, W, D)

    def maps(first: int, count: int) -> np.ndarray:
        block[0, 0, 0, :] = first // SHARD  # every shard's bytes differ
        return block[:count]

    labels = np.zeros(shards * SHARD, dtype=np.int64)
    store = write_cache(folder, labels, maps, grid=GRID, channels=CHANNELS, shard_size=SHARD)
    for path in folder.glob("*-0*.npy"):
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - AGE_NS))
    return store


def evict(folder: Path) -> None:
    """Drop this folder's files from the page cache (they are clean: written and synced)."""
    for path in folder.glob("*.npy"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_open(folder: Path, *, stamp: bool) -> float:
    """Seconds to open (and verify) the store as a new process would."""
    verify._MEMO.clear()
    if not stamp:
        (folder / verify.STAMP_NAME).unlink(missing_ok=True)
    start = time.perf_counter()
    FeatureStore(folder)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gigabytes", type=float, default=2.0)
    args = parser.parse_args()
    print(f"machine: {machine()}; sha256, {verify.VERIFY_THREADS} files hashed at once")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        store = fake_cache(folder, args.gigabytes)
        shards = -(-len(store) // store.shard_size)
        files = [p for s in range(shards) for p in shard_paths(folder, s)]
        size = sum(p.stat().st_size for p in files) / 1e9
        print(f"wrote {shards} shards, {size:.2f} GB, in {time.perf_counter() - start:.1f} s")
        warm = timed_open(folder, stamp=False)
        evict(folder)
        cold = timed_open(folder, stamp=False)
        stamped = min(timed_open(folder, stamp=True) for _ in range(5))
    imagenet = IMAGENET_IMAGES * IMAGENET_VIEWS * (np.prod(GRID) * CHANNELS * 2 + CHANNELS * 4) / 1e9
    imagenet_files = 2 * -(-IMAGENET_IMAGES * IMAGENET_VIEWS // SHARD)
    per_file = stamped / len(files)
    print("| open | seconds | GB/s | ImageNet (1.28M x 2 views) |")
    print("|---|---|---|---|")
    for name, seconds in (("first, page cache", warm), ("first, from disk", cold)):
        print(
            f"| {name} (sha256) | {seconds:.2f} | {size / seconds:.2f} | {imagenet / (size / seconds):.0f} s |"
        )
    print(f"| stamped (stat only) | {stamped:.4f} | - | {per_file * imagenet_files:.2f} s |")
    print(f"per-file stat-and-compare cost: {per_file * 1e6:.1f} us; ImageNet cache: {imagenet:.0f} GB "
          f"in {imagenet_files} files")  # fmt: skip


if __name__ == "__main__":
    main()
