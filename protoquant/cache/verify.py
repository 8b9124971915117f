"""Checking shards against their records: structure, sizes, sha256, and a stamp that spares re-hashing.

A file is hashed (sha256, VERIFY_THREADS files at once) the first time it is checked; the stamp
`verified.json` then holds each verified file's (size, mtime_ns, inode, sha256), so later
checks only `os.stat` the files, and a file whose stat differs is hashed again. Filesystem
timestamps are coarse, so a file changed within RACY_NS of the moment its digest was taken
could keep its mtime through a change: such a file is hashed again until it is older (git's
"racily clean" rule). Within one process a file is hashed at most once per (size, mtime, inode),
also where the stamp cannot be written (a read-only cache).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from protoquant.atomic import sha256_file, write_bytes_atomic
from protoquant.cache.files import FEATURES_DTYPE, POOLED_DTYPE, shard_paths
from protoquant.errors import CacheError

logger = logging.getLogger(__name__)

STAMP_NAME = "verified.json"
RACY_NS = 2 * 10**9  # files changed this close to their digest are re-hashed (coarsest timestamps: 2 s)
VERIFY_THREADS = 4  # files hashed at once (hashlib releases the GIL)


@dataclass(frozen=True)
class ShardProblem:
    """What is wrong with one file of shard `shard`."""

    shard: int
    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class CacheIntegrityError(CacheError):
    """A cache's shard is missing or differs from its record; `problems` lists every one found."""

    def __init__(self, problems: list[ShardProblem]) -> None:
        more = f" ({len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        super().__init__(f"{problems[0]}{more}; rerunning caching (build_cache) recomputes the bad shards")
        self.problems = problems


def signature(stat: os.stat_result) -> tuple[int, int, int]:
    """(size, mtime_ns, inode): what says a file is still the one that was hashed."""
    return stat.st_size, stat.st_mtime_ns, stat.st_ino


class _DigestMemo:
    """sha256 of the files this process hashed, by (path, size, mtime_ns, inode)."""

    def __init__(self) -> None:
        self._digests: dict[tuple, str] = {}
        self._mutex = threading.Lock()

    def digest(self, path: Path) -> str:
        started = time.time_ns()
        key = (str(path), *signature(os.stat(path)))
        with self._mutex:
            known = self._digests.get(key)
        if known is not None:
            return known
        digest = sha256_file(path)
        if key[2] < started - RACY_NS:  # not racily clean: its mtime would show a later change
            with self._mutex:
                self._digests[key] = digest
        return digest

    def clear(self) -> None:
        with self._mutex:
            self._digests.clear()


_MEMO = _DigestMemo()  # per process, so that one file is hashed at most once by it


def file_digest(path: Path) -> str:
    """sha256 hex digest of the file at `path` (memoised in this process). Raises OSError."""
    return _MEMO.digest(path)


def record_problem(
    record: object, shard: int, first: int, rows: int, grid: list, channels: int
) -> str | None:
    """Why `record` does not describe shard `shard` (entries first..first+rows-1) of a cache
    with maps (H, W) = grid and D = channels, or None when it does."""
    features, pooled = (p.name for p in shard_paths(Path(), shard))
    expected = {
        features: ([rows, *grid, channels], FEATURES_DTYPE),
        pooled: ([rows, channels], POOLED_DTYPE),
    }
    if not isinstance(record, dict) or [record.get(k) for k in ("shard", "first", "rows")] != [
        shard,
        first,
        rows,
    ]:
        return f"record does not describe shard {shard} ({rows} entries from {first})"
    files = record.get("files")
    if not isinstance(files, dict) or sorted(files) != sorted(expected):
        return f"record lists files {sorted(files) if isinstance(files, dict) else files}, expected {sorted(expected)}"
    for name, (shape, dtype) in expected.items():
        entry = files[name]
        if not isinstance(entry, dict) or [entry.get("shape"), entry.get("dtype")] != [shape, dtype]:
            found = [entry.get("shape"), entry.get("dtype")] if isinstance(entry, dict) else entry
            return f"record says {name} is {found}, expected {[shape, dtype]}"
        if not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
            return f"record of {name} lacks its byte size or sha256"
    return None


def _size_problem(path: Path, expected: int) -> tuple[str | None, tuple | None]:
    """(why the file is unusable, None) or (None, its signature)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return "missing", None
    except OSError as err:
        return f"unreadable ({err.strerror})", None
    if stat.st_size < expected:
        return f"truncated: {stat.st_size} of {expected} bytes", None
    if stat.st_size > expected:
        return f"wrong size: {stat.st_size} bytes, its record says {expected}", None
    return None, signature(stat)


def _hash_problem(path: Path, expected: str) -> str | None:
    try:
        digest = file_digest(path)
    except OSError as err:
        return f"unreadable ({err.strerror})"
    return (
        None
        if digest == expected
        else f"checksum mismatch: sha256 {digest[:16]}..., its record says {expected[:16]}..."
    )


def _load_stamp(folder: Path) -> tuple[dict, int]:
    """(file name -> [size, mtime_ns, inode, sha256], the stamp's own mtime_ns); empty if none."""
    path = folder / STAMP_NAME
    try:
        stamped_ns = os.stat(path).st_mtime_ns
        files = json.loads(path.read_text())["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except FileNotFoundError:
        return {}, 0
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("%s: unreadable (%s); every shard is verified again", path, err)
        return {}, 0
    return files, stamped_ns


def write_stamp(folder: Path, files: dict) -> None:
    """Save the stamp (file name -> [size, mtime_ns, inode, sha256]); a read-only folder is skipped."""
    try:
        write_bytes_atomic(folder / STAMP_NAME, json.dumps({"files": files}).encode())
    except OSError as err:
        logger.debug("%s: not written (%s)", folder / STAMP_NAME, err)


def verify_shards(folder: Path, records: list[dict]) -> list[ShardProblem]:
    """Check every file of every record (valid per `record_problem`) in `folder`.

    Files the stamp vouches for are only stat-ed; the others are hashed and, when they match,
    added to the stamp. Returns the problems found, by shard (empty: all good).
    """
    stamp, stamped_ns = _load_stamp(folder)
    problems, verified, to_hash = [], {}, []
    for record in records:
        for name, entry in record["files"].items():
            problem, sig = _size_problem(folder / name, entry["bytes"])
            if problem is not None:
                problems.append(ShardProblem(record["shard"], folder / name, problem))
            elif stamp.get(name) == [*sig, entry["sha256"]] and sig[1] < stamped_ns - RACY_NS:
                verified[name] = stamp[name]
            else:
                to_hash.append((record["shard"], name, [*sig, entry["sha256"]]))
    with ThreadPoolExecutor(max_workers=VERIFY_THREADS) as pool:
        found = list(pool.map(lambda item: _hash_problem(folder / item[1], item[2][3]), to_hash))
    for (shard, name, stamped), problem in zip(to_hash, found):
        if problem is None:
            verified[name] = stamped
        else:
            problems.append(ShardProblem(shard, folder / name, problem))
    if len(verified) > len(stamp) or any(stamp.get(k) != v for k, v in verified.items()):
        write_stamp(folder, verified)
    return sorted(problems, key=lambda p: (p.shard, p.path.name))
