"""Reading a finished feature cache: verified, memory-mapped shards, batches in any order.

The folder layout is described in `protoquant.cache.build`, which builds it. Opening a store
checks the manifest and every shard against its record (`protoquant.cache.verify`: hashed
once, then only stat-ed against the stamp) and raises an error naming the bad file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from protoquant.cache.files import MANIFEST_NAME, shard_paths
from protoquant.cache.manifest import Plan, labels_problem, manifest_record_problems, read_manifest
from protoquant.cache.verify import CacheIntegrityError, verify_shards


class FeatureStore:
    """Read-only view of a finished, verified cache folder; shards are memory-mapped.

    Args:
        folder: the cache folder.
        labels: (N_images,) the dataset's labels; the manifest's must equal them. Without it
            the manifest's labels are used (readers of a cache whose dataset is not at hand).

    Attributes:
        labels: (N,) int64 label of each entry.
        image_index, view_index: (N,) which image and view each entry is.

    Raises:
        FileNotFoundError: no manifest. RuntimeError: the cache is incomplete.
        ValueError: the manifest is not valid, or its labels differ from `labels`.
        CacheIntegrityError (a ValueError): a shard file is missing, truncated or corrupt.
    """

    def __init__(self, folder: str | Path, labels: np.ndarray | None = None) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        if not self.manifest["complete"]:
            raise RuntimeError(f"feature cache {self.folder} is incomplete; rerun caching to resume it")
        if labels is not None and (problem := labels_problem(self.manifest, labels)) is not None:
            raise ValueError(
                f"{self.folder / MANIFEST_NAME}: {problem}; rerunning caching recomputes the cache"
            )
        problems = manifest_record_problems(Plan(self.folder, self.manifest))
        unusable = {problem.shard for problem in problems}
        sound = [r for s, r in enumerate(self.manifest["shards"]) if s not in unusable]
        problems = sorted(problems + verify_shards(self.folder, sound), key=lambda p: p.shard)
        if problems:
            raise CacheIntegrityError(problems)
        self.views = int(self.manifest["key"]["views"])
        self.shard_size = int(self.manifest["shard_size"])
        self.channels = int(self.manifest["channels"])
        self.grid = tuple(self.manifest["grid"])
        image_labels = np.asarray(self.manifest["labels"] if labels is None else labels, dtype=np.int64)
        self.labels = np.repeat(image_labels, self.views)
        entries = np.arange(len(self.labels))
        self.image_index, self.view_index = entries // self.views, entries % self.views
        num_shards = len(self.manifest["shards"])
        self._shards = [np.load(shard_paths(self.folder, s)[0], mmap_mode="r") for s in range(num_shards)]
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
            parts = [np.load(shard_paths(self.folder, s)[1]) for s in range(len(self._shards))]
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
