"""Names of the files in a cache folder, and atomic writes.

Every file is written to a temporary name in its folder (`protoquant.atomic.temporary_path`) and
renamed into place, so a reader sees either the whole file or none of it; a failed write
removes its temporary file, and those of killed processes are removed by
`protoquant.atomic.clean_leftovers` when a build opens the folder.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from protoquant.atomic import write_file_atomic

MANIFEST_NAME = "manifest.json"
FEATURES_DTYPE, POOLED_DTYPE = "float16", "float32"  # the dtypes of the two files of a shard


def atomic_save_npy(path: Path, blocks: Sequence[np.ndarray]) -> str:
    """Save row blocks (arrays of one dtype and the same shape past the first axis) as one `.npy`
    array at `path`, atomically and without joining them; not flushed to disk (the shard's
    record checks it). Returns the file's sha256, computed from the bytes as they are written.
    """
    first = blocks[0]
    if any(b.dtype != first.dtype or b.shape[1:] != first.shape[1:] for b in blocks):
        raise ValueError(f"{path}: blocks of different dtypes or row shapes: {[b.shape for b in blocks]}")
    header = io.BytesIO()
    shape = (sum(len(b) for b in blocks), *first.shape[1:])
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(first.dtype), "fortran_order": False, "shape": shape}
    )
    digest = hashlib.sha256(header.getvalue())

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            file.write(header.getvalue())
            for block in blocks:
                data = memoryview(np.ascontiguousarray(block)).cast("B")
                digest.update(data)
                file.write(data)

    write_file_atomic(path, write, suffix=".npy", durable=False)
    return digest.hexdigest()


def shard_paths(folder: Path, shard: int) -> tuple[Path, Path]:
    """(features, pooled) file paths of shard `shard`."""
    return folder / f"features-{shard:05d}.npy", folder / f"pooled-{shard:05d}.npy"


def record_path(folder: Path, shard: int) -> Path:
    """The record of shard `shard`: what its two files hold, written after both."""
    return folder / f"shard-{shard:05d}.json"
