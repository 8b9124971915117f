"""Shard writes: row blocks written as one array, hashed as they are written, on several threads."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from protoquant.atomic import sha256_file
from protoquant.cache import shards
from protoquant.cache.files import atomic_save_npy, record_path, shard_paths
from protoquant.cache.shards import ShardWriter, write_shard


def _blocks(seed: int, sizes=(3, 1, 4)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    features = [rng.standard_normal((n, 2, 3, 5)).astype(np.float16) for n in sizes]
    pooled = [rng.standard_normal((n, 5)).astype(np.float32) for n in sizes]
    return features, pooled


def _audit(shard: int, first: int = 0) -> dict:
    return {"shard": shard, "first": first, "count": 8, "split": "train", "rank": 0}


def test_blocks_are_written_as_the_joined_array_and_hashed_as_written(tmp_path) -> None:
    features, pooled = _blocks(0)
    record = write_shard(tmp_path, 0, features, pooled, _audit(0))
    joined = tmp_path / "joined.npy"
    np.save(joined, np.concatenate(features))
    features_path, pooled_path = shard_paths(tmp_path, 0)
    assert features_path.read_bytes() == joined.read_bytes()  # byte for byte what np.save writes
    assert np.array_equal(np.load(pooled_path), np.concatenate(pooled))
    for path in (features_path, pooled_path):
        entry = record["files"][path.name]
        assert entry["sha256"] == sha256_file(path) and entry["bytes"] == path.stat().st_size
    assert record["rows"] == 8 and record["files"][features_path.name]["shape"] == [8, 2, 3, 5]
    assert json.loads(record_path(tmp_path, 0).read_text()) == record


def test_a_single_array_is_one_block(tmp_path) -> None:
    features, pooled = _blocks(1, sizes=(6,))
    record = write_shard(tmp_path, 3, features[0], pooled[0], _audit(3))
    assert np.array_equal(np.load(shard_paths(tmp_path, 3)[0]), features[0]) and record["rows"] == 6


def test_blocks_that_do_not_fit_together_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="blocks of different dtypes or row shapes"):
        atomic_save_npy(tmp_path / "x.npy", [np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match="blocks of different dtypes or row shapes"):
        atomic_save_npy(tmp_path / "x.npy", [np.zeros((2, 3), np.float16), np.zeros((2, 3), np.float32)])
    assert list(tmp_path.iterdir()) == []


def test_a_non_finite_value_names_its_entry_across_blocks(tmp_path) -> None:
    features, pooled = _blocks(2)
    features[2][1, 0, 0, 0] = np.inf  # row 3 + 1 + 1 = 5 of the shard
    with pytest.raises(ValueError, match=r"shard 4 \(entries 40\.\.47\).* 1 entries, first 45, last 45"):
        write_shard(tmp_path, 4, features, pooled, _audit(4, first=40))
    assert list(tmp_path.iterdir()) == []


def test_the_writer_runs_shards_at_once_and_logs_every_one(tmp_path, monkeypatch) -> None:
    running, most = [0], [0]
    mutex = threading.Lock()
    real = shards.atomic_save_npy

    def slow(path, blocks):
        with mutex:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.05)
        try:
            return real(path, blocks)
        finally:
            with mutex:
                running[0] -= 1

    monkeypatch.setattr(shards, "atomic_save_npy", slow)
    released = []
    writer = ShardWriter(threads=3)
    for shard in range(6):
        writer.submit(
            tmp_path, shard, *_blocks(shard), _audit(shard), done=lambda s=shard: released.append(s)
        )
    writer.close()
    assert most[0] > 1 and sorted(released) == list(range(6))
    lines = (tmp_path / "written-rank0.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["shard"] for line in lines) == list(range(6))  # whole lines, none lost
    assert all(record_path(tmp_path, s).exists() for s in range(6))


def test_the_first_failed_write_is_raised_once(tmp_path, monkeypatch) -> None:
    def disk_full(path, blocks):
        raise OSError(f"{path}: no space left on device")

    monkeypatch.setattr(shards, "atomic_save_npy", disk_full)
    writer = ShardWriter(threads=2)
    released = []
    with pytest.raises(OSError, match="no space left"):
        for shard in range(5):
            writer.submit(
                tmp_path, shard, *_blocks(shard), _audit(shard), done=lambda s=shard: released.append(s)
            )
        writer.close()
    writer.close()  # the later failures are logged, not raised again
    assert writer.failed and len(released) >= 1


def test_a_check_the_caller_made_is_used_instead_of_a_second_pass(tmp_path) -> None:
    features, pooled = _blocks(5)
    finite = [np.ones(len(f), dtype=bool) for f in features]
    finite[1][0] = False  # row 3, as caching's device-side check would report it
    with pytest.raises(ValueError, match=r"1 entries, first 13, last 13"):
        write_shard(tmp_path, 1, features, pooled, _audit(1, first=10), finite)
    assert list(tmp_path.iterdir()) == []
