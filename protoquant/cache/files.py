"""Names of the files in a cache folder, and atomic writes.

Every file is written to a temporary name in its folder (`protoquant.atomic.temporary_path`) and
renamed into place, so a reader sees either the whole file or none of it; a failed write
removes its temporary file, and those of killed processes are removed by
`protoquant.atomic.clean_leftovers` when a build opens the folder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from protoquant.atomic import write_file_atomic

MANIFEST_NAME = "manifest.json"
FEATURES_DTYPE, POOLED_DTYPE = "float16", "float32"  # the dtypes of the two files of a shard


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save `array` as `path` atomically; not flushed to disk (the shard's record checks it)."""
    write_file_atomic(path, lambda tmp: np.save(tmp, array), suffix=".npy", durable=False)


def shard_paths(folder: Path, shard: int) -> tuple[Path, Path]:
    """(features, pooled) file paths of shard `shard`."""
    return folder / f"features-{shard:05d}.npy", folder / f"pooled-{shard:05d}.npy"


def record_path(folder: Path, shard: int) -> Path:
    """The record of shard `shard`: what its two files hold, written after both."""
    return folder / f"shard-{shard:05d}.json"
