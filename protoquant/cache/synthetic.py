"""Complete caches written from arrays, in the real format (for benchmarks and memory tests).

`write_cache` goes through the same shard writer, records and completion stamp as `build_cache`,
so what it writes opens, verifies and trains like a cache of real images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from protoquant.cache.manifest import Plan, mark_complete
from protoquant.cache.shards import write_shard
from protoquant.cache.store import FeatureStore


def write_cache(
    folder: Path,
    labels: np.ndarray,
    shard_maps: Callable[[int, int], np.ndarray],
    *,
    grid: Sequence[int],
    channels: int,
    shard_size: int,
    classes: Sequence[str] | None = None,
) -> FeatureStore:
    """Write a complete 1-view cache of len(labels) entries into `folder` and open it.

    shard_maps(first, count) returns the (count, H, W, D) float16 maps of entries
    first .. first + count - 1; the pooled file is their spatial mean.
    """
    labels = np.asarray(labels, dtype=np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"key": {"views": 1}, "digest": "synthetic", "num_entries": len(labels)}
    manifest |= {"shard_size": shard_size, "channels": channels, "grid": list(grid)}
    manifest |= {"labels": labels.tolist(), "complete": False}
    manifest["classes"] = list(classes) if classes is not None else [str(c) for c in range(labels.max() + 1)]
    plan = Plan(folder, manifest)
    for shard in range(plan.num_shards):
        first, count = plan.rows(shard)
        maps = shard_maps(first, count).astype(np.float16)  # (n, H, W, D)
        pooled = maps.astype(np.float32).mean(axis=(1, 2))  # (n, D)
        audit = {"shard": shard, "first": first, "count": count, "split": "synthetic", "rank": 0}
        write_shard(folder, shard, maps, pooled, audit)
    mark_complete(plan)
    return FeatureStore(folder, labels=labels)
