"""The (N, K) training-score tables stage 2 reads batch by batch: one tensor, or files on disk.

`ScoresInMemory` holds the table as one tensor; `ScoresOnDisk` reads the files that the ranks
wrote (`write_rows`, one per rank) with positioned reads, so its memory depends on the batch size
and K, not on N. Both give the same batches. `protoquant.train.scores` decides which is used.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from protoquant.errors import CacheError
from protoquant.train.prune import class_mean_scores

IOV_MAX = 1024  # <limits.h>: buffers one preadv may fill
STREAM_ROWS = 512  # rows per read when the per-class means stream through a table on disk


class TrainingScores:
    """(N, K) fixed scores of the training rows with their (N,) labels, read batch by batch.

    `ScoresInMemory` holds one tensor (the rows of every rank); `ScoresOnDisk` reads the files
    that the ranks wrote. Both give the same batches, so a fit is the same on either.
    """

    labels: torch.Tensor  # (N,)

    def __len__(self) -> int:
        return len(self.labels)

    def on(self, device: torch.device) -> TrainingScores:
        """This table with its batches delivered on `device`."""
        raise NotImplementedError

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, K) float32 scores and (B,) labels of rows `rows`, on the table's device."""
        raise NotImplementedError

    def class_means(self, num_classes: int) -> torch.Tensor:
        """(C, K) float32 mean scores over each class's rows (1 row counted for a class without rows)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (nothing for a table in memory)."""


class ScoresInMemory(TrainingScores):
    """The whole (N, K) table as one tensor."""

    def __init__(self, scores: torch.Tensor, labels: torch.Tensor) -> None:
        self.scores, self.labels = scores, labels

    def on(self, device: torch.device) -> ScoresInMemory:
        return ScoresInMemory(self.scores.to(device), self.labels.to(device))

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.from_numpy(rows).to(self.scores.device)
        return self.scores[index].float(), self.labels[index]

    def class_means(self, num_classes: int) -> torch.Tensor:
        return class_mean_scores(self.scores.float(), self.labels, num_classes)


class ScoresOnDisk(TrainingScores):
    """(N, K) rows in files, one per rank: row i is row i // W of file i % W (W = len(paths)).

    Every read is a positioned read into a buffer allocated for it, so memory is O(B * K)
    whatever N. A memory map is slower or larger: the page cache holds these files in large
    folios, which a fault maps whole (BENCHMARKS.md, "Stage 2 from scratch files").
    """

    def __init__(self, paths: list[Path], labels: torch.Tensor, prototypes: int, dtype: torch.dtype) -> None:
        self.paths, self.labels, self.prototypes = paths, labels, prototypes
        self.dtype, self.device = dtype, torch.device("cpu")
        self.numpy_dtype = torch.empty(0, dtype=dtype).numpy().dtype
        self.row_bytes = prototypes * dtype.itemsize
        self.files = [open(path, "rb", buffering=0) for path in paths]
        for part, (path, file) in enumerate(zip(paths, self.files)):
            expected = len(range(part, len(labels), len(paths))) * self.row_bytes
            if (size := os.fstat(file.fileno()).st_size) != expected:
                self.close()
                raise CacheError(f"{path}: {size} bytes of training scores, expected {expected}")

    def on(self, device: torch.device) -> ScoresOnDisk:
        view = copy.copy(self)
        view.device = device
        return view

    def batch(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.from_numpy(self.rows(rows)).to(self.device).float()
        return scores, self.labels[torch.from_numpy(rows)].to(self.device)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """(B, K) scores of global rows `rows` as stored (float32 or float16), on the CPU."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.prototypes), dtype=self.numpy_dtype)  # (B, K)
        part_of, local = np.remainder(rows, len(self.paths)), rows // len(self.paths)
        for part in np.unique(part_of):
            positions = np.flatnonzero(part_of == part)
            positions = positions[np.argsort(local[positions], kind="stable")]  # file order
            self._read(int(part), local[positions], positions, out)
        return out

    def _read(self, part: int, local: np.ndarray, positions: np.ndarray, out: np.ndarray) -> None:
        """Rows `local` (ascending) of file `part` into out[positions]: one preadv per run of
        adjacent rows (at most IOV_MAX long); the Python work per row is one list item."""
        starts = run_starts(local)
        stops = [*starts[1:].tolist(), len(local)]
        offsets = (local[starts] * self.row_bytes).tolist()
        views = [out[p] for p in positions.tolist()]  # (K,) views of the batch buffer
        fd = self.files[part].fileno()
        for first, stop, offset in zip(starts.tolist(), stops, offsets):
            if os.preadv(fd, views[first:stop], offset) != (stop - first) * self.row_bytes:
                raise CacheError(f"{self.paths[part]}: ended before byte {offset}; it changed while read")

    def class_means(self, num_classes: int) -> torch.Tensor:
        sums = torch.zeros(num_classes, self.prototypes, dtype=torch.float64)  # (C, K)
        for start in range(0, len(self), STREAM_ROWS):
            rows = np.arange(start, min(start + STREAM_ROWS, len(self)))
            labels = self.labels[torch.from_numpy(rows)].long()
            sums.index_add_(0, labels, torch.from_numpy(self.rows(rows)).double())
        counts = torch.bincount(self.labels.long(), minlength=num_classes).clamp(min=1)  # (C,)
        return (sums / counts[:, None]).float()

    def close(self) -> None:
        for file in self.files:
            file.close()


def run_starts(local: np.ndarray) -> np.ndarray:
    """Where runs of consecutive values begin in ascending `local`, a run cut every IOV_MAX items."""
    new_run = np.diff(local, prepend=local[:1] - 2) != 1  # (B,) True where a run begins
    run_id = np.cumsum(new_run) - 1
    first_of_run = np.flatnonzero(new_run)[run_id]  # (B,) index where each item's run begins
    return np.flatnonzero(new_run | ((np.arange(len(local)) - first_of_run) % IOV_MAX == 0))


def as_training_scores(train: TrainingScores | tuple[torch.Tensor, torch.Tensor]) -> TrainingScores:
    """A table of (scores (N, K), labels (N,)), or the table itself."""
    return train if isinstance(train, TrainingScores) else ScoresInMemory(*train)


def write_rows(batches: Iterator[torch.Tensor], path: Path) -> None:
    """Append the rows of every (B, K) batch to `path` (under a temporary name until complete)."""
    part = path.with_name(f".{path.name}.part")
    with open(part, "wb") as file:
        for batch in batches:
            file.write(batch.contiguous().numpy().data)
    part.rename(path)
