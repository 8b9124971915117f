"""Processes building one cache at once never compute a shard twice, and finish what a dead one left."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from protoquant.cache import lock
from protoquant.cache.build import FeatureStore, build_cache
from protoquant.cache.lock import ShardLocks
from protoquant.errors import CacheError
from tests.cache import lock_job
from tests.cache.test_build import CountingBackbone, _transform

JOB = Path(__file__).with_name("lock_job.py")
ROOT = Path(__file__).parents[2]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _audit(folder: Path) -> list[dict]:
    return [
        json.loads(line) for f in folder.glob("written-rank*.jsonl") for line in f.read_text().splitlines()
    ]


def test_two_processes_building_one_cache_write_every_shard_once(tmp_path) -> None:
    """This process and a second one build the same cache at once (a start barrier, slow images)."""
    root, start = tmp_path / "cache", tmp_path / "start"
    start.mkdir()
    other = subprocess.Popen(
        [sys.executable, str(JOB), str(root), str(start), "other"], env=_env(), stderr=subprocess.PIPE
    )
    lock_job.main(str(root), str(start), "this")
    _, stderr = other.communicate(timeout=300)
    assert other.returncode == 0, stderr.decode()[-3000:]
    (folder,) = root.iterdir()
    records = _audit(folder)
    store = FeatureStore(folder)
    assert sorted(r["shard"] for r in records) == list(range(-(-len(store) // store.shard_size)))
    assert {r["pid"] for r in records} == {os.getpid(), other.pid}  # both took part


def test_a_shard_held_by_a_process_that_dies_is_computed_after_it(
    convnext, tiny_synthetic, cache_config
) -> None:
    counting = CountingBackbone(convnext)
    transform = _transform(counting)
    build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config, shards=[0])  # the folder
    (folder,) = Path(cache_config.root).iterdir()
    ShardLocks(folder)  # creates locks/
    hold = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(2.0)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(folder / "locks" / "shard-00002.lock")], stdout=subprocess.PIPE
    )
    assert holder.stdout.readline() == b"held\n"
    counting.images = 0
    started = time.monotonic()
    store = build_cache(tiny_synthetic, counting, transform, views=2, config=cache_config)
    assert holder.wait(timeout=60) == 0 and time.monotonic() - started >= 1.0  # waited for it
    assert counting.images == 36 - 8  # shard 2 once, after the holder died without writing it
    records = _audit(folder)
    assert [r["shard"] for r in records] == [0, 1, 3, 4, 2]  # shard 2 skipped, then done after the holder
    assert {r["pid"] for r in records} == {os.getpid()}
    reference_config = replace(cache_config, root=str(Path(cache_config.root).parent / "reference"))
    reference = build_cache(tiny_synthetic, convnext, transform, views=2, config=reference_config)
    assert torch.equal(store.get(np.arange(36)), reference.get(np.arange(36)))


def test_a_lock_is_exclusive_between_processes_and_freed_on_release(tmp_path) -> None:
    locks = ShardLocks(tmp_path)
    assert locks.claim(3) and len(locks) == 1
    probe = (
        "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "try:\n fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB); print('free')\n"
        "except BlockingIOError:\n print('held')"
    )
    path = str(tmp_path / "locks" / "shard-00003.lock")

    def other_process_sees() -> str:
        return subprocess.run(
            [sys.executable, "-c", probe, path], capture_output=True, text=True
        ).stdout.strip()

    assert other_process_sees() == "held"
    locks.release(3)
    assert len(locks) == 0 and other_process_sees() == "free"


def test_a_filesystem_without_locks_names_the_lock_file(tmp_path, monkeypatch) -> None:
    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(lock.fcntl, "flock", refuse)
    locks = ShardLocks(tmp_path)
    open_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(
        CacheError, match=r"shard-00003\.lock: the filesystem there does not support file locks"
    ):
        locks.claim(3)
    assert len(os.listdir("/proc/self/fd")) == open_before and len(locks) == 0  # nothing left open

    def broken(fd: int, operation: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(lock.fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error") as raised:
        locks.claim(3)
    assert not isinstance(raised.value, CacheError)  # other failures are not called "no locks"
