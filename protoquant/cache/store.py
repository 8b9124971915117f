"""Reading a finished feature cache: memory-mapped shards, batches in any order.

The folder layout is described in `protoquant.cache.build`, which builds it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch


class FeatureStore:
    """Read-only view of a finished cache folder; shards are memory-mapped.

    Attributes:
        labels: (N,) int64 label of each entry.
        image_index, view_index: (N,) which image and view each entry is.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        manifest_path = self.folder / "manifest.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"no feature cache manifest at {manifest_path}")
        self.manifest = json.loads(manifest_path.read_text())
        if not self.manifest.get("complete"):
            raise RuntimeError(f"feature cache {self.folder} is incomplete; rerun caching to resume it")
        self.views = int(self.manifest["key"]["views"])
        self.shard_size = int(self.manifest["shard_size"])
        self.channels = int(self.manifest["channels"])
        self.grid = tuple(self.manifest["grid"])
        image_labels = np.asarray(self.manifest["labels"], dtype=np.int64)
        self.labels = np.repeat(image_labels, self.views)
        entries = np.arange(len(self.labels))
        self.image_index, self.view_index = entries // self.views, entries % self.views
        num_shards = -(-len(self.labels) // self.shard_size)
        self._shards = [
            np.load(self.folder / f"features-{s:05d}.npy", mmap_mode="r") for s in range(num_shards)
        ]
        self._pooled: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def entries(self, *, first_view_only: bool = False) -> np.ndarray:
        """Entry ids, optionally only view 0 of each image (evaluation)."""
        return np.flatnonzero(self.view_index == 0) if first_view_only else np.arange(len(self))

    def get(self, entries: np.ndarray) -> torch.Tensor:
        """Features of `entries` as float32 (B, D, H, W)."""
        entries = np.asarray(entries, dtype=np.int64)
        out = np.empty((len(entries), *self.grid, self.channels), dtype=np.float16)  # (B, H, W, D)
        shard_of, row_of = np.divmod(entries, self.shard_size)
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            rows = row_of[mask]
            order = np.argsort(rows)
            out[np.flatnonzero(mask)[order]] = self._shards[shard][rows[order]]
        return torch.from_numpy(out).float().permute(0, 3, 1, 2)  # (B, D, H, W)

    def pooled(self) -> torch.Tensor:
        """Spatial mean of every entry, (N, D) float32 (read once, then kept in memory)."""
        if self._pooled is None:
            parts = [np.load(self.folder / f"pooled-{s:05d}.npy") for s in range(len(self._shards))]
            self._pooled = np.concatenate(parts)
        return torch.from_numpy(self._pooled)

    def batches(
        self,
        entries: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: np.random.Generator | None = None,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield (features (B, D, H, W), labels (B,)) over `entries`."""
        order = generator.permutation(entries) if shuffle else np.asarray(entries)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield self.get(chunk), torch.from_numpy(self.labels[chunk])
