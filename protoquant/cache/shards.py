"""Writing cache shards: atomic file writes and a background writer thread.

Every file is written to a temporary name in its folder and renamed into place, so a reader
(or a resumed run) sees either the whole file or none of it. `ShardWriter` saves shards on
one background thread while the backbone computes the next ones; it holds at most
`max_pending` shards in memory and re-raises a failed write in the caller.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def shard_paths(folder: Path, shard: int) -> tuple[Path, Path]:
    """(features, pooled) file paths of shard `shard`."""
    return folder / f"features-{shard:05d}.npy", folder / f"pooled-{shard:05d}.npy"


def write_shard(folder: Path, shard: int, features: np.ndarray, pooled: np.ndarray, record: dict) -> None:
    """Save one shard's two files, then append `record` to this rank's audit log.

    features: (n, H, W, D) float16; pooled: (n, D) float32; record: who wrote which entries.
    """
    features_path, pooled_path = shard_paths(folder, shard)
    atomic_save_npy(features_path, features)
    atomic_save_npy(pooled_path, pooled)
    with open(folder / f"written-rank{record['rank']}.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


class ShardWriter:
    """Runs `write_shard` calls on one background thread, in order, with bounded memory."""

    def __init__(self, max_pending: int = 2) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer")
        self._pending: list[Future] = []
        self._max_pending = max_pending

    def submit(self, *args) -> None:
        """Queue write_shard(*args); waits (and re-raises) while `max_pending` writes are queued."""
        while len(self._pending) >= self._max_pending:
            self._pending.pop(0).result()
        self._pending.append(self._pool.submit(write_shard, *args))

    def close(self) -> None:
        """Wait for every queued write; re-raise the first failure."""
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pending = []
            self._pool.shutdown(wait=True)
