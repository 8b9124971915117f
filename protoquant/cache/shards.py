"""Writing cache shards: atomic file writes, shard records and a background writer thread.

Every file is written atomically (`protoquant.cache.files`). A shard
is its two `.npy` files plus its record `shard-NNNNN.json` (sha256, bytes, shape, dtype of
each file), written last: a shard counts as finished only once its record exists and matches
its files. `ShardWriter` saves shards on background threads while the backbone computes the
next ones; it holds at most `max_pending` shards in memory and re-raises a failed write in the
caller. A shard's rows arrive as blocks (one per batch) and are written, and hashed, as they come,
never joined into one array.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from protoquant.atomic import write_bytes_atomic
from protoquant.cache.files import atomic_save_npy, record_path, shard_paths
from protoquant.cache.verify import signature

logger = logging.getLogger(__name__)

WRITER_THREADS = 4  # shards written at once: hashing and file writes release the GIL
_LOG_MUTEX = threading.Lock()  # one audit line at a time into a rank's log

__all__ = [
    "ShardWriter",
    "atomic_save_npy",
    "read_record",
    "shard_paths",
    "write_shard",
]


def read_record(folder: Path, shard: int) -> dict | None:
    """The record of `shard`, or None when it is missing or not a JSON object."""
    try:
        record = json.loads(record_path(folder, shard).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def check_finite(
    features: Sequence[np.ndarray],
    pooled: Sequence[np.ndarray],
    audit: dict,
    finite: Sequence[np.ndarray] | None = None,
) -> None:
    """Raise ValueError naming the shard, its entries and the split if any value is NaN or inf.

    features: (n_i, H, W, D) row blocks; pooled: (n_i, D) row blocks; audit: the shard's audit
    record (shard, first, split); finite: (n_i,) bool blocks, whether each entry's values are
    all finite, when the caller checked them already (caching checks on the device).
    """
    if finite is None:
        finite = [np.isfinite(f.reshape(len(f), -1)).all(axis=1) for f in features]
        finite = [f & np.isfinite(p).all(axis=1) for f, p in zip(finite, pooled)]
    finite = np.concatenate(finite)
    if finite.all():
        return
    bad = audit["first"] + np.flatnonzero(~finite)
    first, last = audit["first"], audit["first"] + len(finite) - 1
    raise ValueError(
        f"{audit['split']}: shard {audit['shard']} (entries {first}..{last}) has non-finite features "
        f"(NaN or inf) in {len(bad)} entries, first {bad[0]}, last {bad[-1]} (float16 overflow of the "
        f"backbone output?); the shard was not written"
    )


def _file_entry(path: Path, blocks: Sequence[np.ndarray], digest: str) -> dict:
    """What a record says about one written file (stat taken after the rename)."""
    size, mtime_ns, inode = signature(os.stat(path))
    return {
        "bytes": size,
        "sha256": digest,
        "shape": [sum(len(b) for b in blocks), *blocks[0].shape[1:]],
        "dtype": str(blocks[0].dtype),
        "mtime_ns": mtime_ns,
        "inode": inode,
    }


def write_shard(
    folder: Path,
    shard: int,
    features: np.ndarray | Sequence[np.ndarray],
    pooled: np.ndarray | Sequence[np.ndarray],
    audit: dict,
    finite: Sequence[np.ndarray] | None = None,
) -> dict:
    """Save one shard's two files and its record, then append `audit` to this rank's log.

    features: (n, H, W, D) float16; pooled: (n, D) float32; either may also be given as row
    blocks in order (one per batch), which are written one after another and never joined.
    audit: who wrote which entries (shard, first, count, split, rank, world, pid). finite:
    per-entry blocks from a check the caller made (`check_finite`), else checked here. Returns
    the record. Raises ValueError (nothing written) when a value is not finite.
    """
    blocks = [[a] if isinstance(a, np.ndarray) else list(a) for a in (features, pooled)]
    check_finite(*blocks, audit, finite)
    files = {}
    for path, parts in zip(shard_paths(folder, shard), blocks):
        files[path.name] = _file_entry(path, parts, atomic_save_npy(path, parts))
    rows = sum(len(b) for b in blocks[0])
    record = {"shard": shard, "first": audit["first"], "rows": rows, "files": files}
    write_bytes_atomic(record_path(folder, shard), json.dumps(record).encode())
    with _LOG_MUTEX, open(folder / f"written-rank{audit['rank']}.jsonl", "a") as handle:
        handle.write(json.dumps(audit) + "\n")
    return record


class ShardWriter:
    """Runs `write_shard` calls on up to `threads` background threads, with bounded memory.

    Writes of different shards run at once (the sha256 of a shard's maps alone runs at about
    1.6 GB/s on one core: BENCHMARKS.md, "Shard writes"). At most `max_pending` shards (default
    threads + 1) are held in memory. The first failed write is raised once (by `submit` or
    `close`, in the order the writes were submitted); later failures, which an earlier one
    usually caused, are logged.
    """

    def __init__(self, threads: int = WRITER_THREADS, max_pending: int | None = None) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="shard-writer")
        self._pending: list[Future] = []
        self._max_pending = max_pending or threads + 1
        self.failed = False

    def _wait(self, future: Future) -> None:
        error = future.exception()
        if error is None:
            return
        if self.failed:
            logger.error("another shard write failed too: %s", error)
            return
        self.failed = True
        raise error

    def submit(self, *args, done: Callable[[], None] = lambda: None) -> None:
        """Queue write_shard(*args), then `done()` whether it worked or not; waits (and
        re-raises) while `max_pending` writes are queued."""
        while len(self._pending) >= self._max_pending:
            self._wait(self._pending.pop(0))
        self._pending.append(self._pool.submit(_write_then, args, done))

    def close(self) -> None:
        """Wait for every queued write; re-raise the first failure not raised yet."""
        try:
            while self._pending:
                self._wait(self._pending.pop(0))
        finally:
            for future in self._pending:
                future.exception()  # wait: every write has ended when close returns
            self._pending = []
            self._pool.shutdown(wait=True)


def _write_then(args: tuple, done: Callable[[], None]) -> dict:
    try:
        return write_shard(*args)
    finally:
        done()
