"""Reading a finished feature cache: verified, memory-mapped shards, batches in any order.

The folder layout is described in `protoquant.cache.build`, which builds it. Opening a store
checks the manifest and every shard against its record (`protoquant.cache.verify`: hashed
once, then only stat-ed against the stamp) and raises an error naming the bad file.
"""

from __future__ import annotations

import os
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

    @property
    def map_nbytes(self) -> int:
        """Bytes of one stored map (H * W * D half-precision values)."""
        return int(np.prod(self.grid)) * self.channels * np.dtype(np.float16).itemsize

    def get(self, entries: np.ndarray) -> torch.Tensor:
        """Features of `entries` as float32 (B, D, H, W)."""
        entries = np.asarray(entries, dtype=np.int64)
        out = np.empty((len(entries), *self.grid, self.channels), dtype=np.float16)  # (B, H, W, D)
        self.gather(entries, out)
        return torch.from_numpy(out).float().permute(0, 3, 1, 2)  # (B, D, H, W)

    def gather(self, entries: np.ndarray, out: np.ndarray) -> None:
        """Copy the stored float16 maps of `entries` into `out` (B, H, W, D), in the given order.

        `out` may be any writable float16 array of that shape, e.g. the numpy view of a pinned
        host tensor; the rows of each shard are read in file order.
        """
        entries = np.asarray(entries, dtype=np.int64)
        expected = (len(entries), *self.grid, self.channels)
        if out.shape != expected or out.dtype != np.float16:
            raise ValueError(
                f"{self.folder}: gather needs a float16 {expected} array, got {out.dtype} {out.shape}"
            )
        shard_of, row_of = np.divmod(entries, self.shard_size)
        for shard in np.unique(shard_of):
            mask = shard_of == shard
            rows = row_of[mask]
            order = np.argsort(rows)
            out[np.flatnonzero(mask)[order]] = self._shards[shard][rows[order]]

    def cells(self, entries: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> torch.Tensor:
        """Single cells as float32 (n, D): row i is cell (rows[i], cols[i]) of entry entries[i].

        Only those n D-vectors are read (one positioned read each, grouped by shard, in file
        order), not whole maps nor the mapped pages around them: memory is O(n * D) whatever
        the size of the cache.

        Raises:
            ValueError: the three index arrays differ in length.
            IndexError: an entry, row or column is out of range.
        """
        entries, rows, cols = (np.asarray(a, dtype=np.int64).reshape(-1) for a in (entries, rows, cols))
        self._check_cells(entries, rows, cols)
        height, width = self.grid
        shard_of, row_of = np.divmod(entries, self.shard_size)
        cell_of = (row_of * height + rows) * width + cols  # (n,) cell index within its shard
        out = np.empty((len(entries), self.channels), dtype=np.float16)  # (n, D)
        for shard in np.unique(shard_of):
            positions = np.flatnonzero(shard_of == shard)
            positions = positions[np.argsort(cell_of[positions], kind="stable")]
            self._read_cells(int(shard), cell_of[positions], positions, out)
        return torch.from_numpy(out).float()

    def _check_cells(self, entries: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        if not len(entries) == len(rows) == len(cols):
            raise ValueError(
                f"{self.folder}: cells needs equally long entries, rows and cols, got "
                f"{len(entries)}, {len(rows)} and {len(cols)}"
            )
        for name, values, bound in (
            ("entry", entries, len(self)),
            ("row", rows, self.grid[0]),
            ("col", cols, self.grid[1]),
        ):
            bad = values[(values < 0) | (values >= bound)]
            if len(bad):
                raise IndexError(f"{self.folder}: {name} {bad[0]} is out of range 0..{bound - 1}")

    def _read_cells(self, shard: int, cells: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        """Read cell cells[i] of `shard` (cells of its (n, H, W, D) array) into out[positions[i]]."""
        mapped = self._shards[shard]
        nbytes = self.channels * out.itemsize
        with open(mapped.filename, "rb", buffering=0) as file:
            for position, cell in zip(positions.tolist(), cells.tolist()):
                offset = mapped.offset + cell * nbytes
                if os.preadv(file.fileno(), [out[position]], offset) != nbytes:
                    raise OSError(
                        f"{mapped.filename}: ended before byte {offset + nbytes} (cell {cell}); "
                        f"the shard changed after the cache was opened"
                    )

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
