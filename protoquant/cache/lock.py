"""Coordination between processes building one cache folder at once (two runs, torchrun ranks).

`ShardLocks` claims a shard with `fcntl.flock` on `locks/shard-NNNNN.lock` before its batches
are produced and lets go once the shard is written; a lock dies with its process, so the claim
of a killed run frees itself. Lock files are never deleted: deleting a lock file that another
process has open would let two processes hold "the same" lock. `try_flock` is the same lock on
any file (the fine-tuning folder's, for instance). A filesystem that refuses locks gets a
CacheError naming the file, not a run whose processes could build the same shard at once.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
from pathlib import Path

from protoquant.errors import CacheError

logger = logging.getLogger(__name__)

NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # flock(2): not supported here


def try_flock(path: Path, *, wait: bool = False) -> int | None:
    """An open descriptor of `path` (created) holding its exclusive `flock`, or None when another
    open file holds it (without `wait`). Closing the descriptor releases the lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as error:
        os.close(fd)
        if error.errno not in NO_LOCKS:
            raise
        raise CacheError(
            f"{path}: the filesystem there does not support file locks ({error.strerror}), which "
            "protoquant takes so that processes sharing the folder do not write the same files at "
            "once; put the folder on a local disk or a filesystem with flock (NFSv4, Lustre mounted "
            "with -o flock)"
        ) from error
    return fd


class ShardLocks:
    """The shard locks this process holds in one cache folder (thread-safe: claimed by the
    loader, released by the writer thread). One open file per held lock."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "locks"
        self.folder.mkdir(exist_ok=True)
        self._held: dict[int, int] = {}
        self._mutex = threading.Lock()

    def claim(self, shard: int, *, wait: bool = False) -> bool:
        """Take the lock of `shard`; without `wait`, False when another process holds it."""
        fd = try_flock(self.folder / f"shard-{shard:05d}.lock", wait=wait)
        if fd is None:
            return False
        with self._mutex:
            self._held[shard] = fd
        return True

    def release(self, shard: int) -> None:
        with self._mutex:
            fd = self._held.pop(shard, None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor of the open file releases its flock

    def wait(self, shard: int) -> None:
        """Block until no other process holds the lock of `shard`."""
        self.claim(shard, wait=True)
        self.release(shard)

    def release_all(self) -> None:
        for shard in list(self._held):
            self.release(shard)

    def __len__(self) -> int:
        return len(self._held)
