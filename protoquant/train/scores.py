"""The fixed pooled scores (N, K) that stage 2 trains on: in memory, or in scratch files.

With frozen prototypes the pooled score of every cached training entry is fixed, so stage 2
computes it once per temperature. Up to `head.scores_memory_mb` the (N, K) table stays in memory
(every process holds all rows, gathered under torchrun); a larger table is written to a scratch
folder inside the training cache's folder, one file per process with the rows that process
computed, and every process reads the rows of each batch back with positioned reads. Memory then
depends on the batch size and K, not on N. The folder is named like every temporary entry of
`protoquant.atomic` (`.scores.tmp-PID-HOST`), so one a killed run leaves is removed by a later one.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from protoquant import distributed, progress
from protoquant.atomic import clean_leftovers, temporary_path
from protoquant.cache.resident import as_source
from protoquant.cache.view import CacheView
from protoquant.config import HeadConfig
from protoquant.errors import CacheError
from protoquant.head import ProtoQuantHead
from protoquant.train.prune import class_mean_scores

logger = logging.getLogger(__name__)

SCORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
SCRATCH_NAME = "scores"  # the folder is `.scores.tmp-PID-HOST` inside the training cache folder
MIB = 2**20
IOV_MAX = 1024  # <limits.h>: buffers one preadv may fill
STREAM_ROWS = 512  # rows per read when the per-class means stream through a table on disk


def scores_dtype(config: HeadConfig) -> torch.dtype:
    """The dtype that stage 2 keeps its fixed (N, K) scores in (head.scores_dtype)."""
    if config.scores_dtype not in SCORE_DTYPES:
        raise ValueError(
            f"head.scores_dtype must be one of {sorted(SCORE_DTYPES)}, got {config.scores_dtype!r}"
        )
    return SCORE_DTYPES[config.scores_dtype]


def score_batches(
    head: ProtoQuantHead, subset: CacheView, batch_size: int, device: torch.device, dtype: torch.dtype
) -> Iterator[torch.Tensor]:
    """(B, K) pooled scores of every batch of the subset, in order, on the CPU as `dtype`.

    The maps are streamed (`protoquant.cache.resident`: on CUDA the next batch is copied on a side
    stream while this one computes; elsewhere each batch is read as `FeatureStore.get` reads it).
    """
    with torch.no_grad():
        batches = as_source(subset, device).batches(subset.entries, batch_size)
        steps = -(-len(subset.entries) // batch_size)
        for features, _ in progress.bar(batches, total=steps, desc="prototype scores", unit="batch"):
            yield head.scores(features).to("cpu", dtype)


def compute_scores(
    head: ProtoQuantHead,
    subset: CacheView,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, K) pooled prototype presence of every entry in the subset (on the CPU, as `dtype`)."""
    return torch.cat(list(score_batches(head, subset, batch_size, device, dtype)))


def all_scores(
    head: ProtoQuantHead,
    subset: CacheView,
    batch_size: int,
    device: torch.device,
    ctx: distributed.Context,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """(N, K) scores of every entry on every rank; under torchrun each rank computes its share."""
    shard = CacheView(subset.store, distributed.shard_for_rank(subset.entries, ctx))
    return distributed.gather_strided(
        compute_scores(head, shard, batch_size, device, dtype), len(subset.entries), ctx
    )


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


class ScoresSource:
    """Computes the training scores of each temperature, in memory or on disk (decided once).

    Use as a context manager: leaving it closes and removes the scratch files, also on error.

    Args:
        train: every training entry. config: stage 2's config (batch size, dtype, memory limit).
        ctx: the processes that share the work (each computes its strided share).
        prototypes: K. tables: how many (N, K) tables are alive at once (one per temperature
            when the top-k cut reads them all at the end).
    """

    def __init__(
        self,
        train: CacheView,
        config: HeadConfig,
        ctx: distributed.Context,
        *,
        prototypes: int,
        tables: int = 1,
    ) -> None:
        self.train, self.ctx, self.batch_size = train, ctx, config.batch_size
        self.dtype = scores_dtype(config)
        self.table_mb = len(train.entries) * prototypes * self.dtype.itemsize / MIB
        self.in_memory, self.count = tables * self.table_mb <= config.scores_memory_mb, tables
        self.folder: Path | None = None
        self.tables: list[ScoresOnDisk] = []
        where = "memory" if self.in_memory else "scratch files in the training cache folder"
        logger.info(
            "stage 2: %d x %.0f MiB of training scores (head.scores_memory_mb %d) -> %s",
            tables, self.table_mb, config.scores_memory_mb, where,
        )  # fmt: skip

    def __enter__(self) -> ScoresSource:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(failed=error is not None)

    def compute(self, head: ProtoQuantHead, device: torch.device) -> TrainingScores:
        """The scores of every training entry under `head`, readable batch by batch on every rank."""
        if self.in_memory:
            scores = all_scores(head, self.train, self.batch_size, device, self.ctx, self.dtype)
            return ScoresInMemory(scores, self.train.labels)
        folder = self._scratch()
        table = len(self.tables)
        shard = CacheView(self.train.store, distributed.shard_for_rank(self.train.entries, self.ctx))
        mine = folder / f"table-{table}.rank-{self.ctx.rank}"
        write_rows(score_batches(head, shard, self.batch_size, device, self.dtype), mine)
        distributed.barrier()  # every rank's file is complete before any rank opens them all
        parts = [folder / f"table-{table}.rank-{rank}" for rank in range(self.ctx.world_size)]
        self.tables.append(ScoresOnDisk(parts, self.train.labels, head.num_prototypes, self.dtype))
        return self.tables[-1]

    def _scratch(self) -> Path:
        """The scratch folder, made by rank 0 on first use; every rank learns its name."""
        if self.folder is None:
            cache = Path(self.train.store.folder)
            name = None
            if self.ctx.is_main:
                clean_leftovers(cache, SCRATCH_NAME)  # of killed runs on this machine
                name = temporary_path(cache / SCRATCH_NAME).name
                self._make_folder(cache / name)
            self.folder = cache / distributed.broadcast_object(name, self.ctx)
            logger.info("stage 2: training scores go to %s (removed at the end)", self.folder)
        return self.folder

    def _make_folder(self, folder: Path) -> None:
        needed = self.table_mb * MIB * self.count
        free = shutil.disk_usage(folder.parent).free
        if free < needed:
            raise CacheError(
                f"{folder.parent}: stage 2 needs {needed / 1e9:.1f} GB for its training scores "
                f"but {free / 1e9:.1f} GB are free; free space or raise head.scores_memory_mb"
            )
        try:
            folder.mkdir()
        except OSError as error:
            raise CacheError(
                f"{folder.parent}: cannot write stage 2's scratch scores there ({error}); the "
                f"training cache folder must be writable, or raise head.scores_memory_mb"
            ) from error

    def close(self, *, failed: bool = False) -> None:
        """Close every table and remove the scratch files (each rank its own, rank 0 the folder)."""
        for table in self.tables:
            table.close()
        if self.folder is None:
            return
        if not failed:
            distributed.barrier()  # no rank still reads another rank's file
        for table in range(len(self.tables) + 1):  # + 1: a table being written when it failed
            (self.folder / f"table-{table}.rank-{self.ctx.rank}").unlink(missing_ok=True)
            (self.folder / f".table-{table}.rank-{self.ctx.rank}.part").unlink(missing_ok=True)
        if not failed:
            distributed.barrier()
        if self.ctx.is_main:
            remove_folder(self.folder, failed)
        self.folder, self.tables = None, []


def write_rows(batches: Iterator[torch.Tensor], path: Path) -> None:
    """Append the rows of every (B, K) batch to `path` (under a temporary name until complete)."""
    part = path.with_name(f".{path.name}.part")
    with open(part, "wb") as file:
        for batch in batches:
            file.write(batch.contiguous().numpy().data)
    part.rename(path)


def remove_folder(folder: Path, failed: bool) -> None:
    """Remove the scratch folder; after a failure, other ranks' files may still be there."""
    if not failed:
        shutil.rmtree(folder)
        return
    try:
        folder.rmdir()
    except OSError:
        logger.warning("stage 2: %s keeps other processes' scores; a later run removes it", folder)
